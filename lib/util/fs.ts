// Durable file replacement shared by every writer (model config, tokenizer files, trainer state,
// reports): a crash or power loss leaves either the old file or the new one, never half of one.
import { open, rename, rm } from 'node:fs/promises';
import { dirname } from 'node:path';

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
