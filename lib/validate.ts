// Argument checks shared by every public function, with one message format:
//   Expected <what> for <name> but received <value>

/** Error thrown for invalid arguments; `code` is stable for programmatic handling. */
export class LimaArgumentError extends TypeError {
  readonly code = 'ERR_LIMA_ARGUMENT';
  /** The option or argument at fault (e.g. "maxLength", "keepEpochs[0]"), when there is one: the CLI names its flag. */
  readonly field?: string;
  constructor(message: string, field?: string) {
    super(message);
    this.name = 'LimaArgumentError';
    if (field !== undefined) this.field = field;
  }
}

/**
 * Thrown by every call on a model or an open file after dispose()/close(), whether the TypeScript
 * layer or the native one notices first: one code for one condition.
 */
export class LimaDisposedError extends Error {
  readonly code = 'ERR_LIMA_DISPOSED';
  constructor(message: string) {
    super(message);
    this.name = 'LimaDisposedError';
  }
}

/** Short human description of a received value for error messages. */
export function describe(v: unknown): string {
  if (v === null) return 'null';
  if (v === undefined) return 'undefined';
  if (typeof v === 'number') return Number.isNaN(v) ? 'NaN' : String(v);
  if (typeof v === 'string') return JSON.stringify(v.length > 40 ? v.slice(0, 40) + '…' : v);
  if (typeof v === 'bigint' || typeof v === 'boolean') return String(v);
  if (ArrayBuffer.isView(v)) {
    const len = 'length' in v ? (v as unknown as { length: number }).length : v.byteLength;
    return `${v.constructor.name} of length ${len}`;
  }
  if (Array.isArray(v)) return `an array of length ${v.length}`;
  if (typeof v === 'function') return 'a function';
  return `an object (${(v as object).constructor?.name ?? 'Object'})`;
}

/** Throws the library's argument error in the standard format. */
export function fail(what: string, name: string, received: unknown): never {
  throw new LimaArgumentError(`Expected ${what} for ${name} but received ${describe(received)}`, name);
}

/** A Float32Array, optionally of an exact length. */
export function expectF32(v: unknown, name: string, length?: number): Float32Array {
  if (!(v instanceof Float32Array)) fail('a Float32Array', name, v);
  if (length !== undefined && v.length !== length) fail(`a Float32Array of length ${length}`, name, v);
  return v;
}

/** An Int32Array, optionally of an exact length. */
export function expectI32(v: unknown, name: string, length?: number): Int32Array {
  if (!(v instanceof Int32Array)) fail('an Int32Array', name, v);
  if (length !== undefined && v.length !== length) fail(`an Int32Array of length ${length}`, name, v);
  return v;
}

/** A safe integer in [min, max]. */
export function expectInt(v: unknown, name: string, min = 0, max = Number.MAX_SAFE_INTEGER): number {
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < min || v > max) {
    const range = max === Number.MAX_SAFE_INTEGER ? `>= ${min}` : `in [${min}, ${max}]`;
    fail(`an integer ${range}`, name, v);
  }
  return v;
}

/** A finite number within [min, max] (bounds inclusive unless `exclusiveMin` / `exclusiveMax`). */
export function expectNumber(
  v: unknown,
  name: string,
  opts: { min?: number; max?: number; exclusiveMin?: boolean; exclusiveMax?: boolean } = {},
): number {
  const { min = -Infinity, max = Infinity, exclusiveMin = false, exclusiveMax = false } = opts;
  if (typeof v !== 'number' || !Number.isFinite(v) || (exclusiveMin ? v <= min : v < min) || (exclusiveMax ? v >= max : v > max)) {
    const parts: string[] = [];
    if (min > -Infinity) parts.push(`${exclusiveMin ? '>' : '>='} ${min}`);
    if (max < Infinity) parts.push(`${exclusiveMax ? '<' : '<='} ${max}`);
    fail(`a finite number${parts.length ? ' ' + parts.join(' and ') : ''}`, name, v);
  }
  return v;
}

/** A plain object (for option bags). */
export function expectObject(v: unknown, name: string): Record<string, unknown> {
  if (typeof v !== 'object' || v === null || Array.isArray(v)) fail('an object', name, v);
  return v as Record<string, unknown>;
}

/** The product of dims as a safe integer, or an error naming the shape. */
export function product(dims: readonly number[], name: string): number {
  let n = 1;
  for (const d of dims) n *= d;
  if (!Number.isSafeInteger(n)) fail('a shape whose element count is a safe integer', name, dims.join('×'));
  return n;
}
