// Loads a CommonJS dependency or a Node built-in the first time it is needed, so that a command
// that never uses it (zstd, progress bars, worker threads) does not pay for loading it at
// start-up. The CLI's startup snapshot (src/cli/snapshot.ts; its bundle defines
// `__BLOBCACHE_SNAPSHOT__`) loads built-ins with its script's own `require`, the only one that
// works while the snapshot is built, and packages from the directory it was started from (see
// {@link setRequireBase}): the path it was built at may have moved since.
import { createRequire } from 'node:module'

declare const __BLOBCACHE_SNAPSHOT__: boolean | undefined
declare const require: NodeJS.Require

const inSnapshot = typeof __BLOBCACHE_SNAPSHOT__ !== 'undefined' && __BLOBCACHE_SNAPSHOT__
let base: NodeJS.Require | undefined

/** Resolves packages from `file`'s directory from now on (see the file comment). */
export function setRequireBase(file: string): void {
  base = createRequire(file)
}

/** Loads `id` (a `node:` built-in or a package of this one's dependencies). */
export function requireLazily(id: string): unknown {
  if (inSnapshot && id.startsWith('node:')) return require(id)
  base ??= createRequire(import.meta.url)
  return base(id)
}

/** The path `id` (a file of a package of this one's dependencies) resolves to, for a thread to load. */
export function resolveLazily(id: string): string {
  base ??= createRequire(import.meta.url)
  return base.resolve(id)
}
