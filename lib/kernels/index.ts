/**
 * Low-level kernels on Float32Arrays with documented shapes. Every function checks its arguments
 * (types, lengths against the shapes) and throws LimaArgumentError before touching native code.
 */
export * from './system.js';
export * from './gemm.js';
export * from './attention.js';
export * from './optim.js';
export * from './layers.js';
export * from './bf16.js';
