// Durable file replacement shared by every writer (model config, tokenizer files, trainer state,
// reports): a crash or power loss leaves either the old file or the new one, never half of one.
import { open, realpath, rename, rm, stat } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';

/** A write that failed; names the file so a full disk or a read-only folder is easy to find. */
export class WriteError extends Error {
  readonly code = 'ERR_LIMA_WRITE';
  constructor(
    readonly path: string,
    cause: unknown,
  ) {
    super(`cannot write ${path}: ${(cause as Error)?.message ?? String(cause)}`, { cause });
    this.name = 'WriteError';
  }
}

/**
 * Fsyncs a folder so a rename inside it survives a power loss. Some filesystems refuse fsync on
 * a directory handle (EINVAL/EISDIR); the rename is still atomic there, so that is not an error.
 */
export async function syncDir(dir: string): Promise<void> {
  let fh;
  try {
    fh = await open(dir, 'r');
    await fh.sync();
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code !== 'EINVAL' && code !== 'EISDIR' && code !== 'EPERM' && code !== 'EBADF') throw e;
  } finally {
    await fh?.close();
  }
}

/**
 * Replaces `path` with `data`: writes `<path>.tmp-<pid>`, fsyncs it, renames it over `path` and
 * fsyncs the folder. On failure the temporary file is removed and a WriteError names `path`.
 */
export async function writeAtomic(path: string, data: string | Uint8Array): Promise<void> {
  const tmp = `${path}.tmp-${process.pid}`;
  try {
    const fh = await open(tmp, 'w');
    try {
      await fh.writeFile(data);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await rename(tmp, path);
    await syncDir(dirname(path));
  } catch (e) {
    await rm(tmp, { force: true }).catch(() => {});
    if (e instanceof WriteError) throw e;
    throw new WriteError(path, e);
  }
}

/** An input that is not a regular file, or an output folder that cannot be one; names the path. */
export class FileKindError extends Error {
  constructor(
    message: string,
    /** ERR_LIMA_NOT_REGULAR_FILE (an input) or ERR_LIMA_OUT_PATH (an output folder). */
    readonly code: 'ERR_LIMA_NOT_REGULAR_FILE' | 'ERR_LIMA_OUT_PATH',
  ) {
    super(message);
    this.name = 'FileKindError';
  }
}

// Kernel pseudo-filesystems: their "regular" files claim size 0, may block or never end, and
// nothing written there is a file. /dev/shm is ordinary tmpfs.
function pseudoRoot(real: string): string | null {
  if (real.startsWith('/dev/shm/') || real === '/dev/shm') return null;
  for (const root of ['/proc', '/sys', '/dev']) if (real === root || real.startsWith(root + '/')) return root;
  return null;
}

/**
 * Refuses an existing input that is not a regular file before anything opens it: a FIFO blocks
 * open() or read() forever, /dev/zero never ends, a folder fails with EISDIR, /proc and /sys files
 * are not what their size says. A missing or unreadable path passes: the reader reports it in its
 * own words. `what` says what the file should be ("a JSONL data file"); `toError` makes the
 * reader's own error class from the reason (default FileKindError, ERR_LIMA_NOT_REGULAR_FILE,
 * "<path>: <reason>").
 */
export async function expectRegularFile(path: string, what: string, toError?: (reason: string) => Error): Promise<void> {
  const st = await stat(path).catch(() => null);
  if (!st) return;
  let kind: string | null = null;
  if (st.isFIFO()) kind = 'a FIFO';
  else if (st.isCharacterDevice() || st.isBlockDevice()) kind = 'a device';
  else if (st.isDirectory()) kind = 'a folder';
  else if (st.isSocket()) kind = 'a socket';
  else if (!st.isFile()) kind = 'not a plain file';
  else {
    const root = pseudoRoot(await realpath(path).catch(() => resolve(path)));
    if (root) kind = `a ${root} pseudo-file`;
  }
  if (kind === null) return;
  const reason = `not a regular file (${kind}); expected ${what}`;
  throw toError ? toError(reason) : new FileKindError(`${path}: ${reason}`, 'ERR_LIMA_NOT_REGULAR_FILE');
}

/**
 * Refuses an output folder that cannot be one, before any work starts: an existing path that is
 * not a folder, or one inside /proc, /sys or /dev (after resolving links of its existing part),
 * where mkdir and writes fail in odd ways or never finish. `what` names it in the message ("--out").
 */
export async function expectOutputDir(path: string, what: string): Promise<void> {
  const bad = (why: string): never => {
    throw new FileKindError(`${path}: ${why}; ${what} must be a folder to write into`, 'ERR_LIMA_OUT_PATH');
  };
  const st = await stat(path).catch(() => null);
  if (st && !st.isDirectory()) bad('exists and is not a folder');
  // The real path of the nearest existing ancestor, plus the part still to be created.
  let dir = resolve(path);
  let rest = '';
  let real: string | null = null;
  while (real === null) {
    real = await realpath(dir).catch(() => null);
    if (real === null) {
      if (dirname(dir) === dir) break;
      rest = rest ? join(basename(dir), rest) : basename(dir);
      dir = dirname(dir);
    }
  }
  const root = pseudoRoot(real === null ? resolve(path) : join(real, rest));
  if (root) bad(`is inside ${root}, a kernel pseudo-filesystem`);
}
