// The built CLI and demo as real processes (dist/, which `npm test` builds before vitest runs):
// - Ctrl-C (a real SIGINT) in the middle of a large copy aborts it: exit 1, a one-line
//   message, and no `.tmp-` file or half-written entry in the destination or the blob cache;
// - on a terminal (a pseudo-terminal from script(1)) the copy draws a progress bar per blob;
// - `npm run demo` (node dist/demo.js) copies across transports, fills a cache and copies an
//   image whose source blobs were deleted from the cache alone.
import { LAUNCHER } from '../helpers/built-cli.js'
import { type ChildProcess, execFileSync, spawn } from 'node:child_process'
import { existsSync } from 'node:fs'
import { readFile, readdir } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import { describe, expect, it } from 'vitest'
import { digestOf, isDigest } from '../../src/digest.js'
import { writeSampleImage } from '../../src/sample-image.js'
import { parseImageName } from '../../src/transports/index.js'
import { listTree, testDir } from '../helpers/conformance.js'
import { writeRandomImage } from '../helpers/random-image.js'

const DIST = resolve(__dirname, '../../dist')
const CLI = join(DIST, 'cli.js')
const DEMO = join(DIST, 'demo.js')

function hasScript(): boolean {
  try {
    execFileSync('script', ['--version'], { stdio: 'ignore' })
    return true
  } catch {
    return false
  }
}

interface Exit {
  code: number | null
  signal: NodeJS.Signals | null
  stdout: string
  stderr: string
}

function collect(child: ChildProcess): Promise<Exit> {
  return new Promise((resolvePromise, reject) => {
    let stdout = ''
    let stderr = ''
    child.stdout?.on('data', (d) => (stdout += d))
    child.stderr?.on('data', (d) => (stderr += d))
    child.on('error', reject)
    child.on('close', (code, signal) => resolvePromise({ code, signal, stdout, stderr }))
  })
}

const temps = async (dir: string) => (await listTree(dir)).filter((p) => p.split('/').pop()!.startsWith('.tmp-'))

describe.skipIf(!existsSync(CLI))('blobcache CLI process', () => {
  it('Ctrl-C aborts a large copy cleanly: exit 1, and no temporary or partial file in the destination or cache', async () => {
    const root = await testDir()
    // three incompressible 32 MiB layers recompressed at gzip level 9: seconds of work
    await writeRandomImage(parseImageName(`dir:${root}/src`), { layers: 3, layerSize: 32 << 20, compression: null })
    const dest = join(root, 'dest')
    const cache = join(root, 'cache')
    const child = spawn(LAUNCHER, [
      'copy', '--dest-compress-format', 'gzip', '--dest-compress-level', '9', '--blob-cache', cache,
      `dir:${root}/src`, `oci:${dest}:x`,
    ], { stdio: ['ignore', 'pipe', 'pipe'] })
    const exited = collect(child)
    let running = true
    exited.finally(() => (running = false))
    // interrupt once the copy is writing blobs
    while (running && (await temps(dest)).length === 0) await new Promise((r) => setTimeout(r, 10))
    expect(running).toBe(true)
    const sent = Date.now()
    child.kill('SIGINT')
    const r = await exited
    expect(Date.now() - sent).toBeLessThan(5000)
    expect([1, 130]).toContain(r.code)
    expect(r.stderr).toMatch(/interrupted/)
    expect(r.stderr.trimEnd().split('\n').at(-1)).toBe(`blobcache: copying dir:${root}/src to oci:${dest}:x: interrupted`)
    expect(await temps(dest)).toEqual([])
    expect(await temps(cache)).toEqual([])
    // nothing was committed, and whatever the cache holds is whole
    expect(existsSync(join(dest, 'index.json')) ? JSON.parse(await readFile(join(dest, 'index.json'), 'utf8')).manifests : []).toEqual([])
    for (const name of await readdir(cache)) {
      const d = name.replace(/\.config$/, '')
      if (isDigest(d)) expect(digestOf(await readFile(join(cache, name)))).toBe(d)
    }
  })

  it.skipIf(!hasScript())('draws a progress bar per blob on a terminal', async () => {
    const root = await testDir()
    const sample = await writeSampleImage(parseImageName(`oci:${root}/src:latest`))
    const command = [LAUNCHER, 'copy', `oci:${root}/src:latest`, `dir:${root}/out`].map((a) => `'${a}'`).join(' ')
    const r = await collect(spawn('script', ['-qec', command, '/dev/null'], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, COLUMNS: '120' } }))
    expect(r.code).toBe(0)
    const out = r.stdout.replaceAll('\r', '\n')
    expect(out).toContain('\x1b[?25l') // the cursor is hidden while the bars are drawn
    for (const [label, d] of [...sample.layers.map((l) => ['blob', l.digest]), ['config', sample.config.digest]]) {
      expect(out).toMatch(new RegExp(`Copying ${label} +${d.slice(7, 19)} \\[=+\\] .*done`))
    }
    expect(out).toContain('Writing manifest to image destination')
    expect(digestOf(await readFile(join(root, 'out', 'manifest.json')))).toBe(sample.digest)
  })
})

describe.skipIf(!existsSync(DEMO))('npm run demo', () => {
  it('copies across transports, fills the cache cold, then copies from the cache alone', async () => {
    const r = await collect(spawn(process.execPath, [DEMO], { stdio: ['ignore', 'pipe', 'pipe'] }))
    expect(r.stderr).toBe('')
    expect(r.code).toBe(0)
    const lines = r.stdout.split('\n')
    const root = /^blobcache demo, working in (\S+)$/.exec(lines[0])?.[1]
    expect(root).toBeDefined()
    for (const t of ['dir:image-dir', 'oci-archive:image.oci.tar:latest', 'docker-archive:image.docker.tar', 'oci:zstd:latest']) {
      expect(r.stdout).toContain(t)
    }
    expect(r.stdout).toMatch(/cold: 0 hits, \d+ misses/)
    expect(r.stdout).toMatch(/deleted the 3 layers and the config of oci:sample/)
    const warm = /warm: (\d+) hits from the cache/.exec(r.stdout)
    expect(Number(warm?.[1])).toBeGreaterThanOrEqual(4) // three layers and the config
    expect(r.stdout).toContain('same image as the sample: yes')
    expect(lines.filter(Boolean).at(-1)).toBe(`removed ${root}`)
    expect(existsSync(root!)).toBe(false)
  })
})
