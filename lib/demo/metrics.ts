// What LIMA judged by reading, measured: does a response end where the model decided to end
// (with the end-of-turn token, before the length limit), and does it do what was asked (here: a
// story that uses the requested name and object)?

/** The name and object a story request asks for. */
export interface StoryRequest {
  name: string;
  object: string;
}

/** One generated response and why its generation stopped. */
export interface ScoredGeneration {
  response: string;
  /** 'stop-token' when the model emitted the end-of-turn token; anything else hit a limit. */
  stopReason?: string;
}

/** Counts and shares over a set of dev generations. */
export interface DemoShares {
  n: number;
  /** Responses that ended with the end-of-turn token before the token limit. */
  endedWithEot: number;
  /** Responses that use both the requested name and the requested object. */
  usedNameAndObject: number;
  usedName: number;
  usedObject: number;
}

const escapeRe = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');

/**
 * Whether `word` occurs in `text` as a whole word, ignoring case; a noun may take a plural or
 * possessive ending ("kites", "boxes", "Mia's").
 */
export function usesWord(text: string, word: string): boolean {
  const w = word.trim();
  if (!w) return false;
  return new RegExp(`(?<![\\p{L}\\p{N}])${escapeRe(w)}(?:s|es|'s|’s)?(?![\\p{L}\\p{N}])`, 'iu').test(text);
}

/** Scores generations against their requests (same order, same length). */
export function demoShares(gens: readonly ScoredGeneration[], requests: readonly StoryRequest[]): DemoShares {
  if (gens.length !== requests.length)
    throw new RangeError(`Expected one request per generation (${gens.length}) but received ${requests.length}`);
  const s: DemoShares = { n: gens.length, endedWithEot: 0, usedNameAndObject: 0, usedName: 0, usedObject: 0 };
  gens.forEach((g, i) => {
    const name = usesWord(g.response, requests[i].name);
    const object = usesWord(g.response, requests[i].object);
    if (g.stopReason === 'stop-token') s.endedWithEot++;
    if (name) s.usedName++;
    if (object) s.usedObject++;
    if (name && object) s.usedNameAndObject++;
  });
  return s;
}

/** "15/24 (63 %)". */
export function fmtShare(k: number, n: number): string {
  return `${k}/${n} (${n ? Math.round((100 * k) / n) : 0} %)`;
}
