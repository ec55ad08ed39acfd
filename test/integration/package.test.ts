// The package skeleton (issue 2 item 1) and its public surface: package.json, the built ESM and
// CJS entry points and their type declarations (with TSDoc), the bin, the README, LICENSE and
// the CI script. The dist/ checks need `npm run build` (which `npm test` runs first).
import { execFileSync } from 'node:child_process'
import { existsSync, statSync } from 'node:fs'
import { readFile } from 'node:fs/promises'
import { createRequire } from 'node:module'
import { join, resolve } from 'node:path'
import { pathToFileURL } from 'node:url'
import { describe, expect, it } from 'vitest'
import * as root from '../../src/index.js'

const ROOT = resolve(__dirname, '../..')
const DIST = join(ROOT, 'dist')
const read = (p: string) => readFile(join(ROOT, p), 'utf8')

/** What the package root must export for copy tools and cache users (issue 2 and issue 3). */
const PUBLIC = ['BlobCache', 'cacheLookupReferenceFunc', 'CacheDirectory', 'copyImage', 'parseImageName', 'imageName', 'ImageError', 'parseDigest']

describe('package skeleton', () => {
  it('package.json: ESM with CJS and types exports, a bin, node >= 20, Apache-2.0, the scripts', async () => {
    const pkg = JSON.parse(await read('package.json'))
    expect(pkg).toMatchObject({ name: 'blobcache', type: 'module', license: 'Apache-2.0', bin: { blobcache: './bin/blobcache' } })
    expect(pkg.engines.node).toMatch(/^>=\s*20/)
    expect(pkg.exports['.']).toEqual({
      import: { types: './dist/index.d.ts', default: './dist/index.js' },
      require: { types: './dist/index.d.cts', default: './dist/index.cjs' },
    })
    expect(pkg.scripts.build).toBe('tsup && node scripts/build-snapshot.mjs')
    expect(pkg.scripts.test).toMatch(/vitest run/)
    expect(pkg.scripts.demo).toMatch(/node dist\/demo\.js/)
    expect(pkg.scripts.bench).toMatch(/bench\//)
    const tsconfig = JSON.parse(await read('tsconfig.json'))
    expect(tsconfig.compilerOptions).toMatchObject({ strict: true, module: 'NodeNext' })
    expect(existsSync(join(ROOT, 'vitest.config.ts'))).toBe(true)
  })

  it('LICENSE is Apache-2.0; the README has the set-up commands, a library example and the CLI reference', async () => {
    expect(await read('LICENSE')).toMatch(/Apache License\s+Version 2\.0/)
    const readme = await read('README.md')
    expect(readme).toContain('npm install && npm run demo')
    expect(readme).toMatch(/^npm test/m)
    expect(readme).toMatch(/```ts[\s\S]*from 'blobcache'[\s\S]*```/)
    for (const cmd of ['blobcache copy', 'blobcache inspect', 'blobcache cache ls', 'blobcache cache verify', 'blobcache cache prune']) {
      expect(readme).toContain(cmd)
    }
    for (const flag of ['--blob-cache', '--cache-compression', '--dest-compress-format', '--dest-decompress', '--preserve-digests', '--remove-signatures']) {
      expect(readme).toContain(flag)
    }
  })

  it('.ci/run installs the peer tools from Debian, type checks and runs the tests with every peer required', async () => {
    const ci = (await read('.ci/run')).replace(/\\\n\s*/g, ' ') // join continued lines
    expect(statSync(join(ROOT, '.ci/run')).mode & 0o111).not.toBe(0)
    expect(ci).toMatch(/apt-get install[^\n]*skopeo[^\n]*umoci[^\n]*docker-registry/)
    expect(ci).toMatch(/npm install/)
    expect(ci).toMatch(/tsc --noEmit/)
    expect(ci).toMatch(/BLOBCACHE_REQUIRE_PEERS=1 npm test/)
  })

  it('the package root exports the public API', () => {
    for (const name of PUBLIC) expect(typeof (root as Record<string, unknown>)[name], name).toBe('function')
  })
})

describe.skipIf(!existsSync(join(DIST, 'index.js')))('built package', () => {
  it('loads as ESM and as CJS with the same exports', async () => {
    const esm = (await import(pathToFileURL(join(DIST, 'index.js')).href)) as Record<string, unknown>
    const cjs = createRequire(import.meta.url)(join(DIST, 'index.cjs')) as Record<string, unknown>
    for (const name of PUBLIC) {
      expect(typeof esm[name], `esm ${name}`).toBe('function')
      expect(typeof cjs[name], `cjs ${name}`).toBe('function')
    }
    expect(Object.keys(cjs).sort()).toEqual(Object.keys(esm).sort())
  })

  it('declares types for both, with TSDoc on the cache API', async () => {
    for (const file of ['index.d.ts', 'index.d.cts']) {
      const dts = await readFile(join(DIST, file), 'utf8')
      for (const decl of [
        /\*\/\s*declare class BlobCache implements ImageReference/,
        /\*\/\s*declare function cacheLookupReferenceFunc\(/,
        /\*\/\s*declare class CacheDirectory/,
        /\*\/\s*hasBlob\(info: BlobInfo\)/,
        /\*\/\s*clearCache\(\): Promise<void>/,
        /\*\/\s*declare function copyImage\(/,
      ]) {
        expect(dts, `${file} ${decl}`).toMatch(decl)
      }
      expect(dts).toMatch(/export \{[^}]*\bBlobCache\b[^}]*\}/)
    }
  })

  it('the bin runs and prints the package version', async () => {
    const pkg = JSON.parse(await read('package.json'))
    const cli = join(ROOT, pkg.bin.blobcache)
    expect((await readFile(cli, 'utf8')).startsWith('#!/bin/sh\n')).toBe(true)
    expect(execFileSync(cli, ['--version'], { encoding: 'utf8' }).trim()).toBe(pkg.version)
    // the script it falls back to runs with node too
    expect((await readFile(join(ROOT, 'dist/cli.js'), 'utf8')).startsWith('#!/usr/bin/env node')).toBe(true)
    expect(execFileSync(process.execPath, [join(ROOT, 'dist/cli.js'), '--version'], { encoding: 'utf8' }).trim()).toBe(pkg.version)
  })
})
