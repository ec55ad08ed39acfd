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
    entry: { cli: 'src/cli/main.ts', demo: 'src/demo.ts' },
    format: ['esm'],
    sourcemap: true,
    target: 'node20',
    splitting: false,
    shims: true,
    banner: { js: '#!/usr/bin/env node' },
  },
])
