// placeholder: filled by the layers kernel work
export {};
