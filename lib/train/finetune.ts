// finetune(): supervised fine-tuning with the LIMA recipe. Runs the loop on the model's native
// worker (every step is awaited, so the event loop stays free), emits typed events, writes
// Hugging Face checkpoints with the optimizer state atomically, evaluates and generates on the
// dev set each epoch and keeps an HTML report for LIMA's manual checkpoint choice.
//
// A run never loses or hides work: an output folder holding another run is refused, pruning only
// touches the current run's checkpoints, weights of every epoch LIMA's selection window needs are
// kept, a diverging step is never saved, an interrupted epoch re-runs its dev generations on
// resume, and resuming with changed settings needs each change to be accepted by name.
//
// The code: settings.ts (options, their checks, the hyper-parameters compared on resume),
// checkpoints.ts (the output folder, its lock, trainer states, writing and pruning checkpoints)
// and loop.ts (the run). This module is their public face; imports of it stay as they were.
export {
  LIMA_DEFAULTS,
  FinetuneError,
  selectionEpochs,
  resolveKeepEpochs,
  keepsWeights,
  resolveSaveDtype,
  devGenerationOptions,
  type FinetuneOptions,
  type Hparams,
} from './settings.js';
export {
  finetune,
  learningRate,
  loadData,
  defaultActivationBudget,
  type StartEvent,
  type StepEvent,
  type EpochEvent,
  type CheckpointEvent,
  type StoppedEvent,
  type DoneEvent,
  type DevPhaseEvent,
  type FinetuneEvent,
  type FinetuneResult,
  type FinetuneRun,
} from './loop.js';
