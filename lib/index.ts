/** lima-native: fine-tune LLaMA-family models from Node.js with the LIMA recipe. */
export * as kernels from './kernels/index.js';
export { LimaArgumentError } from './validate.js';
export { NativeLoadError } from './native.js';
