// Chat templates are untrusted input (they come inside downloaded GGUF and tokenizer_config.json
// files), so every rendering runs under fixed bounds, and Hugging Face's {% generation %} markers
// of assistant text survive compilation as sentinel characters (@huggingface/jinja drops them).
import { Environment, Interpreter, Template } from '@huggingface/jinja';

/** Bounds on one rendering of a chat template; the one exceeded is named in the error. */
export const RENDER_LIMITS = {
  /** Loop iterations plus range() items over the whole rendering, and any list's length (the library spends microseconds per iteration). */
  items: 100_000,
  /** Length of any string the template builds, beyond twice the characters it was given. */
  characters: 8_000_000,
  /** Nesting of evaluation (recursive macros); real templates nest about 10 deep. */
  depth: 500,
  /** Wall-clock time. */
  seconds: 2,
} as const;

/** A rendering stopped by RENDER_LIMITS; the message reads "render limit exceeded (...)". */
export class RenderLimitError extends Error {
  constructor(what: string) {
    super(`render limit exceeded (${what})`);
    this.name = 'RenderLimitError';
  }
}

/** Start and end of a {% generation %} block in a marked rendering (Unicode noncharacters). */
export const GENERATION_START = '\uFDD0';
export const GENERATION_END = '\uFDD1';

interface Budget {
  deadline: number;
  maxChars: number;
  steps: number;
  depth: number;
  items: number;
  /** For-loop iterable nodes: what they evaluate to is counted as iterations. */
  loops: Set<unknown>;
}

// The budget of the rendering in progress. Rendering is synchronous, so one slot suffices.
let active: Budget | undefined;

function spend(b: Budget, n: number, what: string): void {
  b.items += n;
  if (b.items > RENDER_LIMITS.items) throw new RenderLimitError(`${RENDER_LIMITS.items} ${what}`);
}

// The library renders with its own Interpreter inside Template.render, so the checks go on the
// prototype's one dispatch method; outside our renderings they do nothing.
type Evaluate = (this: Interpreter, node: { type: string; iterable?: { type: string; lhs?: unknown } } | undefined, env: unknown) => { value: unknown };
const evaluate = Interpreter.prototype.evaluate as unknown as Evaluate;
(Interpreter.prototype as unknown as { evaluate: Evaluate }).evaluate = function (node, env) {
  const b = active;
  if (!b || !node) return evaluate.call(this, node, env);
  try {
    if (++b.depth > RENDER_LIMITS.depth) throw new RenderLimitError(`nesting deeper than ${RENDER_LIMITS.depth}`);
    if ((++b.steps & 255) === 0 && performance.now() > b.deadline) throw new RenderLimitError(`${RENDER_LIMITS.seconds} seconds`);
    if (node.type === 'Program') {
      // Template.render declares its globals where we cannot; swap in the counting range().
      const globals = env as Environment;
      globals.variables.delete('range');
      globals.set('range', range);
    }
    if (node.type === 'For' && node.iterable) b.loops.add(node.iterable.type === 'SelectExpression' ? node.iterable.lhs : node.iterable);
    const v = evaluate.call(this, node, env);
    const x = v.value;
    if (typeof x === 'string' && x.length > b.maxChars) throw new RenderLimitError(`${b.maxChars} characters`);
    if (Array.isArray(x) && x.length > RENDER_LIMITS.items) throw new RenderLimitError(`a list of ${RENDER_LIMITS.items} items`);
    if (b.loops.has(node)) spend(b, x instanceof Map ? x.size : Array.isArray(x) ? x.length : 0, 'loop iterations');
    return v;
  } finally {
    b.depth--;
  }
};

// range() as the library's, except that it counts its items before making them.
function range(start: unknown, stop?: unknown, step: unknown = 1): number[] {
  if (stop === undefined) [start, stop] = [0, start];
  if (!Number.isInteger(start) || !Number.isInteger(stop) || !Number.isInteger(step)) throw new Error('range() expects integers');
  const [a, z, s] = [start as number, stop as number, step as number];
  if (s === 0) throw new Error('range() step must not be zero');
  const n = Math.max(0, Math.ceil((z - a) / s));
  if (active) spend(active, n, 'range() items');
  return Array.from({ length: n }, (_, i) => a + i * s);
}

// Characters of the strings in the render variables (the conversation).
function textSize(v: unknown, depth = 0): number {
  if (typeof v === 'string') return v.length;
  if (depth > 4 || typeof v !== 'object' || v === null) return 0;
  let n = 0;
  for (const x of Array.isArray(v) ? v : Object.values(v)) n += textSize(x, depth + 1);
  return n;
}

// {% generation %} / {% endgeneration %} become expressions printing the sentinels, keeping the
// whitespace handling of a block tag (trim_blocks, lstrip_blocks and the `-` markers).
const GENERATION_TAG = /\{%(-?)\s*(end)?generation\s*(-?)%\}\n?/g;
function markGeneration(source: string): string {
  return source
    .replace(/^[ \t]+(?=\{%-?\s*(?:end)?generation\s*-?%\})/gm, '')
    .replace(GENERATION_TAG, (_, l: string, end: string | undefined, r: string) => `{{${l} '${end ? GENERATION_END : GENERATION_START}' ${r}}}`);
}

/** A compiled chat template whose renderings are bounded by RENDER_LIMITS. */
export class BoundedTemplate {
  private readonly template: Template;
  /** Whether the template marks assistant text with {% generation %} blocks. */
  readonly generation: boolean;

  /** Throws the library's syntax error; `origin` (a file) is kept for messages. */
  constructor(source: string, public origin?: string) {
    this.generation = /\{%-?\s*generation\s*-?%\}/.test(source);
    this.template = new Template(this.generation ? markGeneration(source) : source);
  }

  /** The rendering with GENERATION_START/END around each generation block's output. */
  renderMarked(items: Record<string, unknown>): string {
    const outer = active;
    const budget: Budget = { deadline: performance.now() + RENDER_LIMITS.seconds * 1000, maxChars: RENDER_LIMITS.characters + 2 * textSize(items), steps: 0, depth: 0, items: 0, loops: new Set() };
    active = budget;
    try {
      return this.template.render(items);
    } catch (e) {
      // What the engine refuses itself (stack overflow, a string or array past its maximum length).
      if (e instanceof RangeError) {
        const b = /stack/.test(e.message) ? `nesting deeper than ${RENDER_LIMITS.depth}` : /array/i.test(e.message) ? `a list of ${RENDER_LIMITS.items} items` : `${budget.maxChars} characters`;
        throw new RenderLimitError(b);
      }
      throw e;
    } finally {
      active = outer;
    }
  }

  render(items: Record<string, unknown>): string {
    const text = this.renderMarked(items);
    return this.generation ? text.replaceAll(GENERATION_START, '').replaceAll(GENERATION_END, '') : text;
  }
}
