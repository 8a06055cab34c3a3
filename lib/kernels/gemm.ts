// placeholder: filled by the gemm kernel work
export {};
