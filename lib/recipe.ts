// The LIMA recipe (Zhou et al. 2023, §2 and §3) in one place: the trainer, the data loader and
// the decoder all read their defaults from here, so a change shows up everywhere at once.

/** LIMA's fine-tuning and decoding settings; every field is also an option of finetune(). */
export const LIMA = Object.freeze({
  epochs: 15,
  batchSize: 32,
  lr: 1e-5,
  lrFinal: 1e-6,
  warmupSteps: 0,
  beta1: 0.9,
  beta2: 0.95,
  eps: 1e-8,
  weightDecay: 0.1,
  /** Residual dropout at the top layer; 0 at the bottom, linear in depth. */
  dropout: 0.3,
  /** Texts are cut to this many tokens (and never past the model's positions). */
  maxLength: 2048,
  seed: 0,
  /** LIMA chose its checkpoint by reading dev generations of epochs 5 to 10. */
  selectionEpochs: Object.freeze({ first: 5, last: 10 }),
  /** Nucleus sampling with a repetition penalty, as in LIMA's evaluation. */
  decoding: Object.freeze({ topP: 0.9, temperature: 0.7, repetitionPenalty: 1.2, maxNewTokens: 2048 }),
});
