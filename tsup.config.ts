import { defineConfig } from 'tsup'

export default defineConfig([
  {
    entry: { index: 'src/index.ts' },
    format: ['esm', 'cjs'],
    dts: true,
    sourcemap: true,
    clean: true,
    target: 'node20',
    splitting: false,
    shims: true,
  },
  {
    entry: { cli: 'src/cli/bin.ts', demo: 'src/demo.ts' },
    format: ['esm'],
    sourcemap: true,
    target: 'node20',
    splitting: false,
    shims: true,
    // commander and debug are bundled into the commands: loading them as CommonJS packages from
    // an ES module (resolution, export lexing, one compile per file) cost about 10 ms of every
    // run. Their Node built-ins are loaded through the `require` the banner provides.
    noExternal: ['commander', 'debug'],
    banner: {
      js: "#!/usr/bin/env node\nimport { createRequire as __blobcacheCreateRequire } from 'node:module';\nconst require = __blobcacheCreateRequire(import.meta.url);",
    },
  },
  {
    // The script of the CLI's startup snapshot (src/cli/snapshot.ts; scripts/build-snapshot.mjs
    // makes dist/cli.blob from it). One CommonJS file with every dependency inside: a snapshot
    // script can load Node's built-in modules only.
    entry: { 'cli-snapshot': 'src/cli/snapshot.ts' },
    format: ['cjs'],
    target: 'node20',
    splitting: false,
    shims: true,
    noExternal: [/.*/],
    outExtension: () => ({ js: '.cjs' }),
    define: { __BLOBCACHE_SNAPSHOT__: 'true' },
  },
])
