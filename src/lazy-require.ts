// Loads a CommonJS dependency or a Node built-in the first time it is needed, so that a command
// that never uses it (zstd, progress bars, worker threads) does not pay for loading it at
// start-up. In a CommonJS bundle the module's own `require` is used, in an ES module one made for
// this file. The CLI's startup snapshot (src/cli/snapshot.ts) points package lookups at the
// directory it was started from with {@link setRequireBase}: its script's `require` loads
// built-ins only, and the path the snapshot was built at may have moved since.
import { createRequire } from 'node:module'

declare const require: NodeJS.Require | undefined

const own: NodeJS.Require | undefined = typeof require === 'function' ? require : undefined
let base: NodeJS.Require | undefined

/** Resolves packages from `file`'s directory from now on (see the file comment). */
export function setRequireBase(file: string): void {
  base = createRequire(file)
}

/** Loads `id` (a `node:` built-in or a package of this one's dependencies). */
export function requireLazily(id: string): unknown {
  if (id.startsWith('node:') && own) return own(id)
  base ??= own ?? createRequire(import.meta.url)
  return base(id)
}
