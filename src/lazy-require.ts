// Loads a CommonJS dependency the first time it is needed, so that a command that never uses it
// (zstd, progress bars) does not pay for loading it at start-up. `import.meta.url` is shimmed by
// tsup in the CommonJS build.
import { createRequire } from 'node:module'

/** `require` relative to this package, for dependencies loaded on first use. */
export const requireLazily = createRequire(import.meta.url)
