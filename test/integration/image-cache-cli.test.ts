// `blobcache image-cache …` through main(argv): every subcommand, against the real registry
// where one is needed.
import { cliCommand } from '../helpers/built-cli.js'
import { spawn } from 'node:child_process'
import { existsSync, readFileSync } from 'node:fs'
import { readFile, stat, writeFile } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import { Readable, Writable } from 'node:stream'
import { afterAll, beforeAll, describe, expect, it } from 'vitest'
import { type CliIO, main } from '../../src/cli/main.js'
import { ImageCache } from '../../src/image-cache/index.js'
import { readTarStream } from '../../src/image-cache/tar-stream.js'
import { testDir } from '../helpers/conformance.js'
import { AMD64, ARM64, image, imageBlobs, ociArchiveFiles, putBlob, tarOf, whiteoutImage } from '../helpers/image-cache-fixtures.js'
import { peer } from '../helpers/peers.js'
import { writeRandomImage } from '../helpers/random-image.js'
import { type TestRegistry, registryRef, startRegistry } from '../helpers/registry.js'
import { MediaType } from '../../src/media-types.js'

class Capture extends Writable {
  chunks: Buffer[] = []
  override _write(chunk: Buffer, _enc: BufferEncoding, cb: () => void): void {
    this.chunks.push(Buffer.from(chunk))
    cb()
  }
  get bytes(): Buffer {
    return Buffer.concat(this.chunks)
  }
}

async function cli(argv: string[], env: NodeJS.ProcessEnv = {}) {
  const out = new Capture()
  const err = new Capture()
  const io: CliIO = { stdout: out, stderr: err, isTTY: false, env }
  const code = await main(['image-cache', ...argv], io)
  return { code, stdout: out.bytes.toString(), stderr: err.bytes.toString(), bytes: out.bytes }
}

async function tarPaths(bytes: Buffer): Promise<string[]> {
  const paths: string[] = []
  await readTarStream(Readable.from([bytes]), async (e) => void paths.push(e.path))
  return paths
}

/** A cache dir holding `app:1` (amd64, imported from a tar). */
async function withImage() {
  const root = await testDir()
  const cache = join(root, 'cache')
  const im = await image(AMD64, 41)
  const tarFile = join(root, 'in.tar')
  await writeFile(tarFile, tarOf(ociArchiveFiles(imageBlobs(im), [{
    mediaType: im.mediaType, digest: im.manifestDigest, size: im.manifest.length,
    annotations: { 'io.containerd.image.name': 'docker.io/library/app:1' },
  }])))
  const r = await cli(['--cache', cache, 'import', tarFile])
  expect(r).toMatchObject({ code: 0, stderr: '' })
  expect(r.stdout).toBe(`docker.io/library/app:1 ${im.manifestDigest}\n`)
  return { root, cache, im }
}

describe('blobcache image-cache', () => {
  it('import, ls, export in three formats, rm, gc', async () => {
    const { root, cache, im } = await withImage()
    expect((await cli(['--cache', cache, 'ls'])).stdout).toBe(`docker.io/library/app:1 ${im.manifestDigest}\n`)
    expect(JSON.parse((await cli(['--cache', cache, 'ls', '--json'])).stdout)).toEqual([
      { name: 'docker.io/library/app:1', digest: im.manifestDigest, mediaType: MediaType.ociManifest, size: im.manifest.length },
    ])
    const oci = join(root, 'oci.tar')
    expect(await cli(['--cache', cache, 'export', 'app:1', '--platform', 'linux/amd64', '--outfile', oci])).toMatchObject({ code: 0, stderr: '' })
    expect((await tarPaths(await readFile(oci))).slice(0, 2)).toEqual(['oci-layout', 'index.json'])
    const docker = await cli(['--cache', cache, 'export', 'app:1', '--platform', 'linux/amd64', '--format', 'docker', '--outfile', '-'])
    expect(docker.code).toBe(0)
    expect(await tarPaths(docker.bytes)).toContain('manifest.json')
    const fs = await cli(['--cache', cache, 'export', 'app:1', '--platform', 'linux/amd64', '--format', 'filesystem', '--outfile', '-'])
    expect(await tarPaths(fs.bytes)).toEqual(['layer-0', 'layer-0/random-41.bin', 'layer-1', 'layer-1/random-41.bin'])

    // re-import of our own export into a fresh cache keeps name and digest
    const fresh = join(root, 'fresh')
    expect((await cli(['--cache', fresh, 'import', oci])).stdout).toBe(`docker.io/library/app:1 ${im.manifestDigest}\n`)

    expect((await cli(['--cache', cache, 'rm', 'app:1', 'nothing:2'])).stdout).toBe('removed app:1\nnothing:2 is not in the cache\n')
    expect((await cli(['--cache', cache, 'ls'])).stdout).toBe('')
    const gc = await cli(['--cache', cache, 'gc', '--grace', '0s', '--json'])
    expect(JSON.parse(gc.stdout)).toMatchObject({ removed: [], damaged: [] })
  })

  it('31: export over a longer existing file leaves exactly the new tar', async () => {
    const { root, cache } = await withImage()
    const out = join(root, 'out.tar')
    await writeFile(out, Buffer.alloc(4 << 20, 0x41))
    expect((await cli(['--cache', cache, 'export', 'app:1', '--platform', 'linux/amd64', '--outfile', out])).code).toBe(0)
    const bytes = await readFile(out)
    expect(bytes.length).toBeLessThan(4 << 20)
    expect(bytes.includes(Buffer.alloc(1024, 0x41))).toBe(false)
    expect(await tarPaths(bytes)).toContain('index.json')
  })

  it('exports a flattened file system with whiteouts applied', async () => {
    const root = await testDir()
    const dir = join(root, 'cache')
    const cache = await ImageCache.open(dir)
    const w = whiteoutImage()
    for (const b of [...w.layers, w.config, w.manifest]) await putBlob(dir, b)
    await cache.descriptorWrite('wh:1', { mediaType: MediaType.ociManifest, digest: w.digest, size: w.manifest.length })
    const r = await cli(['--cache', dir, 'export', 'wh:1', '--format', 'filesystem', '--platform', 'linux/amd64', '--outfile', '-'])
    expect((await tarPaths(r.bytes)).sort()).toEqual(['b', 'd', 'd/y', 'e', 'f', 'f/keep'])
  })

  it('uses $BLOBCACHE_IMAGE_CACHE, reports failures in one line, and usage errors with exit 2', async () => {
    const { cache, im } = await withImage()
    expect((await cli(['ls'], { BLOBCACHE_IMAGE_CACHE: cache })).stdout).toBe(`docker.io/library/app:1 ${im.manifestDigest}\n`)
    const missing = await cli(['--cache', cache, 'export', 'nope:1', '--outfile', '-'])
    expect(missing.code).toBe(1)
    expect(missing.stderr).toMatch(/^blobcache: exporting nope:1: .*not in the cache\n$/)
    expect((await cli(['--cache', cache, 'export', 'app:1'])).code).toBe(2)
    expect((await cli(['--cache', cache, 'export', 'app:1', '--format', 'zip', '--outfile', '-'])).code).toBe(2)
    expect((await cli(['--cache', cache, 'pull', '--platform', 'amd64', 'x'])).code).toBe(2)
    const bad = await cli(['--cache', cache, 'import', join(cache, 'index.json')])
    expect(bad.code).toBe(1)
    expect((await stat(join(cache, 'index.json'))).isFile()).toBe(true)
  })
})

const hasRegistry = peer('docker-registry') !== undefined

describe.skipIf(!hasRegistry)('blobcache image-cache with a registry', () => {
  let registry: TestRegistry
  beforeAll(async () => {
    registry = await startRegistry()
  })
  afterAll(async () => {
    await registry?.stop()
  })

  it('pull, push, clean --published-only, clean', async () => {
    const root = await testDir()
    const cache = join(root, 'cache')
    const one = await writeRandomImage(registryRef(registry.host, 'cli/one:1'), { platform: AMD64, seed: 51 })
    await writeRandomImage(registryRef(registry.host, 'cli/two:1'), { platform: ARM64, seed: 52 })
    const pull = await cli(['--cache', cache, 'pull', '--tls-verify=false', '--platform', 'linux/amd64', `${registry.host}/cli/one:1`])
    expect(pull).toMatchObject({ code: 0, stderr: '' })
    expect(pull.stdout).toBe(`${registry.host}/cli/one:1 ${one.manifestDigest}\n`)
    expect((await cli(['--cache', cache, 'pull', '--tls-verify=false', '--platform', 'linux/arm64', `${registry.host}/cli/two:1`])).code).toBe(0)
    const wrong = await cli(['--cache', cache, 'pull', '--tls-verify=false', '--platform', 'linux/arm64', `${registry.host}/cli/one:1`])
    expect(wrong.code).toBe(1)
    expect(wrong.stderr).toContain('does not contain target platforms linux/arm64')

    const push = await cli(['--cache', cache, 'push', '--tls-verify=false', `${registry.host}/cli/one:1`, '--remote-name', `${registry.host}/cli/copy:1`])
    expect(push.stdout).toBe(`pushed ${registry.host}/cli/copy:1 ${one.manifestDigest}\n`)
    const again = await cli(['--cache', cache, 'push', '--tls-verify=false', `${registry.host}/cli/one:1`, '--remote-name', `${registry.host}/cli/copy:1`])
    expect(again.stdout).toContain('not pushed')

    // cli/two moves on the registry: only cli/one is still published
    await writeRandomImage(registryRef(registry.host, 'cli/two:1'), { platform: ARM64, seed: 53 })
    const clean = await cli(['--cache', cache, 'clean', '--published-only', '--tls-verify=false'])
    expect(clean.stdout).toBe(`removed ${registry.host}/cli/one:1\nremoved 1 images\n`)
    expect((await cli(['--cache', cache, 'ls'])).stdout).toMatch(/cli\/two:1 sha256:/)
    expect((await cli(['--cache', cache, 'clean'])).stdout).toBe(`removed ${registry.host}/cli/two:1\nremoved 1 images\n`)
    expect((await cli(['--cache', cache, 'ls'])).stdout).toBe('')
  })
})

// The built command, bin/blobcache (npm test builds dist/ first; BLOBCACHE_CLI runs another
// script with node instead), for stdin.
const CLI = process.env.BLOBCACHE_CLI ?? resolve(__dirname, '../../dist/cli.js')
const hasCli = existsSync(CLI) && readFileSync(CLI, 'utf8').includes('image-cache')

function runCli(args: string[], input?: Buffer): Promise<{ code: number | null; stdout: Buffer; stderr: string }> {
  return new Promise((resolvePromise, reject) => {
    const child = process.env.BLOBCACHE_CLI
      ? spawn(process.execPath, [CLI, ...args], { stdio: ['pipe', 'pipe', 'pipe'] })
      : spawn(...cliCommand(args), { stdio: ['pipe', 'pipe', 'pipe'] })
    const out: Buffer[] = []
    let stderr = ''
    child.stdout.on('data', (d: Buffer) => out.push(d))
    child.stderr.on('data', (d) => (stderr += d))
    child.on('error', reject)
    child.on('close', (code) => resolvePromise({ code, stdout: Buffer.concat(out), stderr }))
    child.stdin.end(input)
  })
}

describe.skipIf(!hasCli)('blobcache image-cache as a process', () => {
  it('exports to stdout and imports from stdin', async () => {
    const { root, cache, im } = await withImage()
    const exported = await runCli(['image-cache', '--cache', cache, 'export', 'app:1', '--platform', 'linux/amd64', '--outfile', '-'])
    expect(exported).toMatchObject({ code: 0, stderr: '' })
    const fresh = join(root, 'from-stdin')
    const imported = await runCli(['image-cache', '--cache', fresh, 'import', '-'], exported.stdout)
    expect(imported).toMatchObject({ code: 0, stderr: '' })
    expect(imported.stdout.toString()).toBe(`docker.io/library/app:1 ${im.manifestDigest}\n`)
  })
})
