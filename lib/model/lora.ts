// LoRA settings (PEFT's conventions) and their checks: the one place that decides which values a
// LoraConfig takes. The adapters themselves live in the native model (LlamaModel.enableLora).
import { expectInt, expectNumber, fail } from '../validate.js';

/** The projections LoRA may adapt (PEFT's module names), in a layer's order. */
export const LORA_TARGETS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] as const;
export type LoraTarget = (typeof LORA_TARGETS)[number];

/**
 * Low-rank adapters on a frozen base: y = x·Wᵀ + s·(drop(x)·Aᵀ)·Bᵀ for every targeted projection
 * of every layer, s = alpha / r (alpha / √r with rslora).
 */
export interface LoraConfig {
  /** Rank, an integer >= 1. */
  r: number;
  /** > 0. */
  alpha: number;
  /** PEFT's lora_dropout on the adapter input, in [0, 1) (training steps only). */
  dropout: number;
  /** A non-empty subset of LORA_TARGETS. */
  targets: string[];
  rslora: boolean;
}

/**
 * A LoraConfig checked field by field (LimaArgumentError naming `<name>.r`, `<name>.alpha`, ...);
 * targets default to all seven, dropout to 0, rslora to false. Returns a fresh copy with targets
 * deduplicated in LORA_TARGETS order.
 */
export function checkLoraConfig(c: unknown, name = 'lora'): LoraConfig {
  if (typeof c !== 'object' || c === null || Array.isArray(c)) fail('a LoRA config object', name, c);
  const o = c as Partial<Record<keyof LoraConfig, unknown>>;
  const r = expectInt(o.r, `${name}.r`, 1);
  const alpha = expectNumber(o.alpha, `${name}.alpha`, { min: 0, exclusiveMin: true });
  const dropout = expectNumber(o.dropout ?? 0, `${name}.dropout`, { min: 0, max: 1, exclusiveMax: true });
  const t = o.targets ?? [...LORA_TARGETS];
  if (!Array.isArray(t) || t.length === 0) fail(`a non-empty array of ${LORA_TARGETS.join(', ')}`, `${name}.targets`, t);
  t.forEach((x, i) => {
    if (!LORA_TARGETS.includes(x as LoraTarget)) fail(`one of ${LORA_TARGETS.join(', ')}`, `${name}.targets[${i}]`, x);
  });
  const rslora = o.rslora ?? false;
  if (typeof rslora !== 'boolean') fail('a boolean', `${name}.rslora`, rslora);
  return { r, alpha, dropout, targets: LORA_TARGETS.filter((x) => t.includes(x)), rslora };
}

/** What a run uses where the issue is silent (finetune's `lora` fields left unset): r 16, alpha 32, dropout 0.05, all seven targets. */
export const LORA_DEFAULTS: Readonly<LoraConfig> = Object.freeze({ r: 16, alpha: 32, dropout: 0.05, targets: [...LORA_TARGETS], rslora: false });

/** The adapters' scale: alpha / r, or alpha / √r with rslora. */
export function loraScale(c: LoraConfig): number {
  return c.rslora ? c.alpha / Math.sqrt(c.r) : c.alpha / c.r;
}
