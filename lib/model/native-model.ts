// The slice of the addon the model uses. Raw numbers cross here; LlamaModel wraps them in types.
import { loadAddon } from '../native.js';
import type { LlamaConfig } from '../io/config.js';

/** One parameter tensor of a model: Hugging Face name, shape and element count. */
export interface ParamInfo {
  name: string;
  shape: number[];
  numel: number;
  /** false for norm gains, which get no weight decay */
  decay: boolean;
}

/** The dtype a native model computes in (products and their inputs; state stays fp32). */
export type NativePrecision = 'fp32' | 'bf16';

/**
 * Activation recomputation of training steps: which per-layer activations are recomputed in
 * backward instead of kept from forward. 'none' keeps all; 'mlp' recomputes gate/up and SwiGLU
 * from the MLP's input; 'all' keeps only each layer's input and re-runs the layer's forward.
 * Losses and gradients are bit-identical in every mode; only memory and time differ.
 */
export type Recompute = 'none' | 'mlp' | 'all';

/** Residual dropout of one training micro-step. */
export interface NativeDropout {
  pMax: number;
  seed: number;
  step: number;
  rowOffset: number;
}

/** The native LlamaModel handle (csrc/binding/model.cc); every long call is a Promise. */
export interface NativeLlama {
  info(): { numParams: number; params: ParamInfo[]; precision: NativePrecision; device: string };
  /** Code paths the model's ops take now: the fp32 ISA and the bf16 product path. */
  paths(): { isa: string; bf16Path: string };
  /** Takes effect at the next step (queued behind running calls). */
  setRecompute(mode: Recompute): Promise<void>;
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
  /**
   * Adds adapters and freezes the base (once); get/setTensor, getGrad and get/setMoment then take
   * adapter names too. tokens: trainable token rows (distinct ids in [0, V)).
   */
  enableLora(config: { r: number; alpha: number; dropout: number; targets: string[]; rslora: boolean }, seed: number, tokens?: readonly number[]): Promise<void>;
  /** The adapters' tensors in model order, then the trainable token rows' ([] without LoRA). */
  loraParams(): ParamInfo[];
  dispose(): Promise<void>;
}

/** NativeLlama's constructor: the CPU addon's (no device) or the CUDA module's (a GPU index). */
export interface NativeLlamaCtor {
  new (config: LlamaConfig, precision?: NativePrecision, gpu?: number): NativeLlama;
  activationBytes(config: LlamaConfig, batch: number, seqLen: number, precision?: NativePrecision, recompute?: Recompute, loraRank?: number, loraDropout?: boolean, loraTokens?: number): number;
}

/** The constructor of native models (loads the addon on first use). */
export function nativeLlama(): NativeLlamaCtor {
  return loadAddon<{ NativeLlama: NativeLlamaCtor }>().NativeLlama;
}
