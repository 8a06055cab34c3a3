// The slice of the addon the model uses. Raw numbers cross here; LlamaModel wraps them in types.
import { loadAddon } from '../native.js';
import type { LlamaConfig } from './config.js';

/** One parameter tensor as the native model lays it out. */
export interface NativeParamInfo {
  name: string;
  shape: number[];
  offset: number;
  numel: number;
  /** false for norm gains, which get no weight decay */
  decay: boolean;
}

/** Residual dropout of one training micro-step. */
export interface NativeDropout {
  pMax: number;
  seed: number;
  step: number;
  rowOffset: number;
}

/** The native LlamaModel handle (csrc/binding/model.cc); every long call is a Promise. */
export interface NativeLlama {
  info(): { numParams: number; params: NativeParamInfo[] };
  setTensor(name: string, data: Float32Array): Promise<void>;
  getTensor(name: string): Promise<Float32Array>;
  getGrad(name: string): Promise<Float32Array>;
  zeroGrads(): Promise<void>;
  initNormal(seed: number, std: number): Promise<void>;
  trainStep(ids: Int32Array, labels: Int32Array, batch: number, seqLen: number, norm: number, dropout: NativeDropout | null): Promise<number>;
  forwardLoss(ids: Int32Array, labels: Int32Array | null, batch: number, seqLen: number, wantLogits: boolean): Promise<{ lossSum: number; count: number; logits?: Float32Array }>;
  decode(ids: Int32Array): Promise<Float32Array>;
  resetCache(): Promise<void>;
  adamwStep(p: { lr: number; beta1: number; beta2: number; eps: number; weightDecay: number; step: number; gradScale: number }): Promise<void>;
  gradSqNorm(): Promise<number>;
  getMoment(name: string, which: 1 | 2): Promise<Float32Array>;
  setMoment(name: string, which: 1 | 2, data: Float32Array): Promise<void>;
  dispose(): Promise<void>;
}

interface NativeLlamaCtor {
  new (config: LlamaConfig): NativeLlama;
  activationBytes(config: LlamaConfig, batch: number, seqLen: number): number;
}

/** The constructor of native models (loads the addon on first use). */
export function nativeLlama(): NativeLlamaCtor {
  return loadAddon<{ NativeLlama: NativeLlamaCtor }>().NativeLlama;
}
