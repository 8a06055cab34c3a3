/** lima-native: fine-tune LLaMA-family models from Node.js with the LIMA recipe. */
export * as kernels from './kernels/index.js';
export { LimaArgumentError, LimaDisposedError } from './validate.js';
export { NativeLoadError, CudaUnavailableError, resolveDevice, type Device, type CudaDeviceInfo, type CudaUnavailableCode } from './native.js';
export {
  LlamaModel,
  ModelLoadError,
  padBatch,
  type EvalResult,
  type EvalRow,
  type GenerateOptions,
  type GenerateResult,
  type GeneratedToken,
  type Prompt,
  type TokenBatch,
  type ParamInfo,
  type Precision,
  type CodePaths,
  type PlacementOptions,
  type Recompute,
  resolvePrecision,
  resolveRecompute,
  RECOMPUTE_MODES,
} from './model/llama.js';
export { LAYOUT_FILE, readLayout, type ChatLayout, type SpecialTokenPolicy } from './model/layout.js';
export { ConfigError, ModelMemoryError, parseHfConfig, toHfConfig, parameterShapes, paramCount, checkModelSize, type LlamaConfig, type Llama3RopeScaling } from './io/config.js';
export { GENERATION_DEFAULTS, resolveSampling, sampleToken, applyRepetitionPenalty, type SamplingOptions } from './model/sampling.js';
export { ByteTokenizer, HfTokenizer, loadTokenizer, DEFAULT_EOT, type Tokenizer } from './tokenizer/index.js';
export { SafetensorsReader, SafetensorsError, writeSafetensors, type TensorInfo, type TensorToWrite, type SafetensorsDtype } from './io/safetensors.js';
export { Llama2cReader, Llama2cError } from './io/llama2c.js';
export { readJsonl, JsonlError, type JsonlRow, type ReadJsonlOptions } from './io/jsonl.js';
export { expectOutputDir, expectRegularFile, FileKindError, writeAtomic, WriteError } from './util/fs.js';
export { OutDirError, prepareModelDir, MODEL_FOLDER_FILES } from './io/outdir.js';
export { LIMA } from './recipe.js';
export { GgufReader, GgufError, convertGguf, type GgufTensor, type GgufConversion } from './io/gguf.js';
export { dequantize, GgmlType, GGML_TYPE_INFO, ggmlTypeName } from './io/ggml-quants.js';
export { readPeftAdapter, writePeftAdapter, checkAdapterFits, PeftAdapterError, type PeftAdapter } from './io/peft.js';
export { applyAdapter, mergeAdapter, baseFingerprint, type MergeOptions, type BaseFingerprint } from './model/adapter.js';
export { LORA_TARGETS, LORA_DEFAULTS, loraScale, type LoraConfig } from './model/lora.js';
export { ggufToHfTokenizer, GgufVocabError, type HfTokenizerFiles } from './tokenizer/gguf-vocab.js';
export { resolveChatTemplate, ChatTemplateError } from './data/format.js';
export { previewDataset, renderExample, type PreviewOptions, type DatasetPreview } from './data/preview.js';
export { Rng } from './util/rng.js';
export { startReview, type ReviewOptions, type ReviewServer, type ChosenCheckpoint } from './review/server.js';
export { ReviewError } from './review/run.js';
export {
  loadDataset,
  loadEvalRows,
  loadTrainDev,
  splitDev,
  formatConversation,
  parseRow,
  detectFormat,
  loadChatTemplate,
  compileChatTemplate,
  epochOrder,
  epochBatches,
  makeBatches,
  microBatches,
  padRows,
  countTargets,
  RowError,
  IGNORE_INDEX,
  PAD_ID,
  DEFAULT_MAX_LENGTH,
  type Example,
  type LoadOptions,
  type LoadedDataset,
  type SkippedRow,
  type TrainDev,
  type TrainDevOptions,
  type Message,
  type Role,
  type RoleMarkers,
  type RowFormat,
  type ParsedRow,
  type ParseOptions,
  type FormatOptions,
  type FormattedConversation,
  type LabeledRow,
  type MicroBatch,
  type SplitBatch,
} from './data/index.js';
export {
  finetune,
  learningRate,
  selectionEpochs,
  FinetuneError,
  LIMA_DEFAULTS,
  type FinetuneOptions,
  type FinetuneEvent,
  type FinetuneRun,
  type FinetuneResult,
  type StartEvent,
  type StoppedEvent,
  type Hparams,
  type StepEvent,
  type EpochEvent,
  type CheckpointEvent,
  type DoneEvent,
  type DevPhaseEvent,
} from './train/finetune.js';
export { planFinetune, formatPlan, countParameters, memoryPlan, diskPlan, type DiskPlan, type FinetunePlan, type MemoryPlan, type PlanOptions } from './train/plan.js';
export type { DevPhaseEstimate } from './train/dev-estimate.js';
export { readLlama2cTokenizer, llama2cTokenizerJson, loadLlama2cTokenizer, type Llama2cVocab } from './io/llama2c-tokenizer.js';
export { runStoriesDemo, sharesTable, STORIES_DEMO_RECIPE, STORIES_DEMO_FILES, type StoriesDemoOptions, type StoriesDemoResult, type DemoEpochShares } from './demo/stories.js';
export { demoShares, usesWord, fmtShare, type DemoShares, type StoryRequest, type ScoredGeneration } from './demo/metrics.js';
