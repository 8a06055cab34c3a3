// placeholder: filled by the attention kernel work
export {};
