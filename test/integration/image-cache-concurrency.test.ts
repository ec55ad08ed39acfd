// Many processes share one image cache: linuxkit-cache.md section 5, scenarios 34 and 35.
// Children run the built package (dist/, built by `npm test` before vitest; BLOBCACHE_DIST
// points elsewhere) through plain .mjs scripts. A reader polls index.json throughout and must
// never see invalid JSON; processes killed with SIGKILL in the middle of writes leave a cache
// that opens, whose lock is free, and that gc cleans.
import { type ChildProcess, spawn } from 'node:child_process'
import { existsSync, readFileSync } from 'node:fs'
import { readFile, readdir, writeFile } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { ImageCache } from '../../src/image-cache/index.js'
import { testDir } from '../helpers/conformance.js'
import { AMD64, ARM64, image, imageBlobs, ociArchiveFiles, putImage, tarOf } from '../helpers/image-cache-fixtures.js'
import { peer } from '../helpers/peers.js'
import { buildRandomImage, writeRandomImage } from '../helpers/random-image.js'
import { type TestRegistry, registryRef, startRegistry } from '../helpers/registry.js'

const DIST = process.env.BLOBCACHE_DIST ?? resolve(__dirname, '../../dist/index.js')
const hasDist = existsSync(DIST) && readFileSync(DIST, 'utf8').includes('ImageCache')
const PROCESSES = 20
const NAMES_EACH = 5

const WRITER = `
import { ImageCache } from ${JSON.stringify(DIST)}
const [dir, id, startAt, descriptor] = process.argv.slice(2)
const cache = await ImageCache.open(dir)
while (Date.now() < Number(startAt)) await new Promise((r) => setTimeout(r, 2))
for (let i = 0; i < ${NAMES_EACH}; i++) await cache.descriptorWrite(\`proc-\${id}/name-\${i}:1\`, JSON.parse(descriptor))
`

const READER = `
import { existsSync, readFileSync } from 'node:fs'
const [file, stopFile] = process.argv.slice(2)
let reads = 0, bad = 0
while (!existsSync(stopFile)) {
  const text = readFileSync(file, 'utf8')
  try { const doc = JSON.parse(text); if (!Array.isArray(doc.manifests)) bad++ } catch { bad++ }
  reads++
}
process.stdout.write(JSON.stringify({ reads, bad }))
`

const LOADER = `
import { createReadStream } from 'node:fs'
import { ImageCache } from ${JSON.stringify(DIST)}
const [dir, tar, startAt] = process.argv.slice(2)
const cache = await ImageCache.open(dir)
while (Date.now() < Number(startAt)) await new Promise((r) => setTimeout(r, 2))
await cache.imageLoad(createReadStream(tar))
`

const PULLER = `
import { ImageCache } from ${JSON.stringify(DIST)}
const [dir, ref, platform, startAt] = process.argv.slice(2)
const cache = await ImageCache.open(dir, { registry: { tlsVerify: false } })
while (Date.now() < Number(startAt)) await new Promise((r) => setTimeout(r, 2))
await cache.imagePull(ref, { platforms: [platform] })
`

/** Writes names forever; the parent kills it. */
const FOREVER = `
import { ImageCache } from ${JSON.stringify(DIST)}
const [dir, descriptor] = process.argv.slice(2)
const cache = await ImageCache.open(dir)
process.stdout.write('ready\\n')
for (let i = 0; ; i++) await cache.descriptorWrite(\`forever/n\${i % 50}:1\`, JSON.parse(descriptor))
`

/** Takes the index lock and holds it until killed. */
const HOLDER = `
import { join } from 'node:path'
import { INDEX_LOCK_FILE, withFileLock } from ${JSON.stringify(DIST)}
const [dir] = process.argv.slice(2)
await withFileLock(join(dir, INDEX_LOCK_FILE), async () => {
  process.stdout.write('locked\\n')
  await new Promise(() => {})
})
`

/** Streams a big archive into imageLoad slowly; the parent kills it mid-blob. */
const SLOW_LOADER = `
import { Readable } from 'node:stream'
import { readFileSync } from 'node:fs'
import { ImageCache } from ${JSON.stringify(DIST)}
const [dir, tar] = process.argv.slice(2)
const bytes = readFileSync(tar)
const cache = await ImageCache.open(dir)
async function* slow() {
  for (let i = 0; i < bytes.length; i += 65536) {
    if (i > bytes.length / 2) { process.stdout.write('halfway\\n'); await new Promise(() => {}) }
    yield bytes.subarray(i, i + 65536)
  }
}
await cache.imageLoad(Readable.from(slow()))
`

interface Result {
  code: number | null
  stdout: string
  stderr: string
}

function start(script: string, args: string[]): { child: ChildProcess; done: Promise<Result> } {
  const child = spawn(process.execPath, [script, ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
  let stdout = ''
  let stderr = ''
  child.stdout!.on('data', (d) => (stdout += d))
  child.stderr!.on('data', (d) => (stderr += d))
  const done = new Promise<Result>((resolvePromise, reject) => {
    child.on('error', reject)
    child.on('close', (code) => resolvePromise({ code, stdout, stderr }))
  })
  return { child, done }
}

function until(child: ChildProcess, text: string): Promise<void> {
  return new Promise((resolvePromise, reject) => {
    let seen = ''
    child.stdout!.on('data', (d) => {
      seen += d
      if (seen.includes(text)) resolvePromise()
    })
    child.on('close', () => reject(new Error(`child exited before printing ${text}`)))
  })
}

async function script(dir: string, name: string, text: string): Promise<string> {
  const file = join(dir, name)
  await writeFile(file, text)
  return file
}

describe.skipIf(!hasDist)('one image cache, many processes', () => {
  it(`34, 35: ${PROCESSES} processes writing distinct names leave every name and valid JSON; a polling reader never sees invalid JSON`, async () => {
    const root = await testDir()
    const dir = join(root, 'cache')
    const cache = await ImageCache.open(dir)
    const d = await putImage(dir, await image(AMD64, 71))
    const writer = await script(root, 'writer.mjs', WRITER)
    const reader = await script(root, 'reader.mjs', READER)
    const startAt = Date.now() + 1500
    const stopFile = join(root, 'stop')
    const polling = start(reader, [join(dir, 'index.json'), stopFile])
    const writers = Array.from({ length: PROCESSES }, (_, i) => start(writer, [dir, String(i), String(startAt), JSON.stringify(d)]).done)
    const results = await Promise.all(writers)
    await writeFile(stopFile, '')
    for (const r of results) expect(r).toMatchObject({ code: 0, stderr: '' })
    const poll = await polling.done
    expect(poll.code).toBe(0)
    const { reads, bad } = JSON.parse(poll.stdout) as { reads: number; bad: number }
    expect(bad).toBe(0)
    expect(reads).toBeGreaterThan(100)
    const names = (await cache.list()).map((e) => e.name)
    expect(names).toHaveLength(PROCESSES * NAMES_EACH)
    for (let i = 0; i < PROCESSES; i++) for (let n = 0; n < NAMES_EACH; n++) expect(names).toContain(`docker.io/proc-${i}/name-${n}:1`)
    expect(JSON.parse(await readFile(join(dir, 'index.json'), 'utf8')).manifests).toHaveLength(PROCESSES * NAMES_EACH)
    expect((await readdir(dir)).sort()).toEqual(['blobs', 'index.json', 'oci-layout'])
  })

  it('34: two processes importing different archives at once both land', async () => {
    const root = await testDir()
    const dir = join(root, 'cache')
    const cache = await ImageCache.open(dir)
    const loader = await script(root, 'loader.mjs', LOADER)
    const tars: string[] = []
    for (const [i, p] of [AMD64, ARM64].entries()) {
      const im = await image(p, 72, 3)
      const file = join(root, `in-${i}.tar`)
      await writeFile(file, tarOf(ociArchiveFiles(imageBlobs(im), [{
        mediaType: im.mediaType, digest: im.manifestDigest, size: im.manifest.length,
        annotations: { 'io.containerd.image.name': `docker.io/library/imported-${i}:1` },
      }])))
      tars.push(file)
    }
    const startAt = String(Date.now() + 1000)
    const results = await Promise.all(tars.map((t) => start(loader, [dir, t, startAt]).done))
    for (const r of results) expect(r).toMatchObject({ code: 0, stderr: '' })
    expect((await cache.list()).map((e) => e.name)).toEqual(['docker.io/library/imported-0:1', 'docker.io/library/imported-1:1'])
    expect(await cache.imageInCache('imported-1:1', 'linux/arm64', { verify: true })).toBe(true)
  })

  it('35: a process killed with SIGKILL while holding the lock, or while writing, leaves a cache that opens and works', async () => {
    const root = await testDir()
    const dir = join(root, 'cache')
    const cache = await ImageCache.open(dir)
    const d = await putImage(dir, await image(AMD64, 73))
    await cache.descriptorWrite('before:1', d)

    const holder = start(await script(root, 'holder.mjs', HOLDER), [dir])
    await until(holder.child, 'locked')
    holder.child.kill('SIGKILL')
    await holder.done
    const t0 = Date.now()
    await cache.descriptorWrite('after-holder:1', d)
    expect(Date.now() - t0).toBeLessThan(2000)

    const forever = await script(root, 'forever.mjs', FOREVER)
    for (let round = 0; round < 6; round++) {
      const p = start(forever, [dir, JSON.stringify(d)])
      await until(p.child, 'ready')
      await sleep(40 + round * 37)
      p.child.kill('SIGKILL')
      await p.done
      const reopened = await ImageCache.open(dir)
      expect((await reopened.list()).length).toBeGreaterThanOrEqual(2)
      await reopened.descriptorWrite(`after-kill-${round}:1`, d)
    }

    const bigTar = join(root, 'big.tar')
    const heavy = await buildRandomImage({ platform: ARM64, seed: 75, layers: 3, layerSize: 1 << 20 })
    await writeFile(bigTar, tarOf(ociArchiveFiles(imageBlobs(heavy), [{
      mediaType: heavy.mediaType, digest: heavy.manifestDigest, size: heavy.manifest.length,
      annotations: { 'io.containerd.image.name': 'docker.io/library/killed:1' },
    }])))
    const slow = start(await script(root, 'slow.mjs', SLOW_LOADER), [dir, bigTar])
    await until(slow.child, 'halfway')
    slow.child.kill('SIGKILL')
    await slow.done
    const after = await ImageCache.open(dir)
    expect(await after.findDescriptor('killed:1')).toBeNull()
    expect(await after.imageInCache('before:1', 'linux/amd64', { verify: true })).toBe(true)
    const report = await after.gc({ graceMs: 0 })
    expect(report.leftovers).toBeGreaterThanOrEqual(1) // the killed import's temp file
    const temps = (await readdir(join(dir, 'blobs', 'sha256'))).filter((n) => n.startsWith('.tmp-'))
    expect(temps).toEqual([])
  })
})

describe.skipIf(!hasDist || !peer('docker-registry'))('processes pulling at once', () => {
  let registry: TestRegistry
  beforeAll(async () => {
    registry = await startRegistry()
  })
  afterAll(async () => {
    await registry?.stop()
  })

  it('34: two processes pull different refs into one cache; both names are present and whole', async () => {
    const root = await testDir()
    const dir = join(root, 'cache')
    const cache = await ImageCache.open(dir)
    await writeRandomImage(registryRef(registry.host, 'conc/a:1'), { platform: AMD64, seed: 76, layers: 3 })
    await writeRandomImage(registryRef(registry.host, 'conc/b:1'), { platform: ARM64, seed: 77, layers: 3 })
    const puller = await script(root, 'puller.mjs', PULLER)
    const startAt = String(Date.now() + 1000)
    const results = await Promise.all([
      start(puller, [dir, `${registry.host}/conc/a:1`, 'linux/amd64', startAt]).done,
      start(puller, [dir, `${registry.host}/conc/b:1`, 'linux/arm64', startAt]).done,
    ])
    for (const r of results) expect(r).toMatchObject({ code: 0, stderr: '' })
    expect((await cache.list()).map((e) => e.name)).toEqual([`${registry.host}/conc/a:1`, `${registry.host}/conc/b:1`])
    expect(await cache.imageInCache(`${registry.host}/conc/a:1`, 'linux/amd64', { verify: true })).toBe(true)
    expect(await cache.imageInCache(`${registry.host}/conc/b:1`, 'linux/arm64', { verify: true })).toBe(true)
  })
})
