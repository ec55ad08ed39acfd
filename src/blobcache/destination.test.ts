import { execFileSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { chmod, mkdir, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { gzipSync } from 'node:zlib'
import { describe, expect, it } from 'vitest'
import { readAll, testDir } from '../../test/helpers/conformance.js'
import { makeLayer } from '../../test/helpers/make-layer.js'
import { MemoryStore, memoryTransport } from '../../test/helpers/memory-transport.js'
import { compressStream, findExecutable } from '../compression.js'
import { type Digest, digestOf } from '../digest.js'
import { MediaType } from '../media-types.js'
import { DirReference } from '../transports/dir.js'
import type { BlobInfo, ImageDestination } from '../types.js'
import { BlobCacheDestination } from './destination.js'
import { openLocalBlob } from './local-file.js'
import { BlobCache } from './reference.js'
import { hasVerifiedStamp } from './stamp.js'
import { Counters } from './stats.js'

const tar = makeLayer([{ name: 'layer-content', content: 'layer-content '.repeat(500) }])
const diffID = digestOf(tar)
const gz = gzipSync(tar)

async function zstd(data: Buffer): Promise<Buffer> {
  return readAll(Readable.from([data]).pipe(compressStream('zstd')))
}

function info(bytes: Buffer, extra: Partial<BlobInfo> = {}): BlobInfo & { digest: Digest } {
  return { digest: digestOf(bytes), size: bytes.length, ...extra }
}

async function setup(mode: 'preserve' | 'compress' | 'decompress' = 'preserve', opts = {}) {
  const root = await testDir()
  const cacheDir = join(root, 'cache')
  await mkdir(cacheDir)
  const cache = new BlobCache(new DirReference(join(root, 'image')), cacheDir, mode, opts)
  const dest = await cache.newImageDestination()
  return { root, cacheDir, cache, dest }
}

/** True when running as root with a working `mount` (CI): then ENOSPC is tested on a tiny tmpfs. */
function canMountTmpfs(): boolean {
  if (process.getuid?.() !== 0) return false
  try {
    execFileSync('mount', ['--version'], { stdio: 'ignore' })
    return true
  } catch {
    return false
  }
}

const entries = async (dir: string) => (await readdir(dir)).sort()

/** Counts the streams the cache's wrapped destination is given through putBlob. */
function countInnerPuts(dest: ImageDestination): { count: number } {
  const counted = { count: 0 }
  const inner = (dest as BlobCacheDestination).inner
  const realPut = inner.putBlob.bind(inner)
  inner.putBlob = async (stream, i, o) => {
    counted.count++
    return realPut(stream, i, o)
  }
  return counted
}

async function put(dest: ImageDestination, bytes: Buffer, extra: Partial<BlobInfo> = {}, isConfig = false) {
  return dest.putBlob(Readable.from([bytes]), info(bytes, extra), { isConfig })
}

describe('BlobCacheDestination.putBlob', () => {
  it('stores an uncompressed layer under its digest and nothing else', async () => {
    const { cacheDir, dest } = await setup()
    const stored = await put(dest, tar)
    expect(stored.digest).toBe(diffID)
    expect(await entries(cacheDir)).toEqual([diffID])
    expect(await readFile(join(cacheDir, diffID))).toEqual(tar)
  })

  it('tees into a .tmp- file in the cache directory and names the entry only when the blob is stored', async () => {
    const { cacheDir, dest } = await setup()
    const seen: string[][] = []
    async function* slow() {
      yield tar.subarray(0, 1000)
      await new Promise((r) => setTimeout(r, 20))
      seen.push(await entries(cacheDir))
      yield tar.subarray(1000)
    }
    await dest.putBlob(Readable.from(slow()), info(tar))
    expect(seen[0]).toHaveLength(1)
    expect(seen[0][0]).toMatch(/^\.tmp-/)
    expect(await entries(cacheDir)).toEqual([diffID])
  })

  it('stores a config as <digest>.config', async () => {
    const { cacheDir, dest } = await setup()
    const config = Buffer.from('{"rootfs":{"type":"layers","diff_ids":[]}}')
    await put(dest, config, {}, true)
    expect(await entries(cacheDir)).toEqual([`${digestOf(config)}.config`])
  })

  it.each([
    ['gzip', async () => gz],
    ['zstd', async () => zstd(tar)],
  ])('decompresses a %s layer into sha256:<diffID> with both notes before resolving', async (alg, make) => {
    const { cacheDir, dest } = await setup()
    const blob = await make()
    const c = digestOf(blob)
    await put(dest, blob)
    expect(await entries(cacheDir)).toEqual([c, `${c}.decompressed`, diffID, `${diffID}.compressed`].sort())
    expect(await readFile(join(cacheDir, diffID))).toEqual(tar)
    expect(await readFile(join(cacheDir, `${c}.decompressed`), 'utf8')).toBe(diffID)
    const note = await readFile(join(cacheDir, `${diffID}.compressed`), 'utf8')
    expect(note).toBe(alg === 'gzip' ? c : `${c} zstd`) // a single gzip variant uses the legacy form
  })

  it.each(['xz', 'bzip2'] as const)('detects and decompresses a %s layer too (with the system tool)', async (alg) => {
    if (!findExecutable(alg)) return
    const { cacheDir, dest } = await setup()
    const blob = execFileSync(alg, ['-c'], { input: tar })
    const c = digestOf(blob)
    await put(dest, blob)
    expect(await entries(cacheDir)).toEqual([c, `${c}.decompressed`, diffID, `${diffID}.compressed`].sort())
    expect(await readFile(join(cacheDir, `${diffID}.compressed`), 'utf8')).toBe(`${c} ${alg}`)
  })

  it('caches a layer whose compressed-looking bytes do not decompress, without a decompressed form', async () => {
    const { cacheDir, cache, dest } = await setup()
    const fake = Buffer.concat([gz.subarray(0, 10), Buffer.from('not really gzip after all')])
    await put(dest, fake)
    expect(await entries(cacheDir)).toEqual([digestOf(fake)])
    expect(cache.stats.errors).toBe(1) // the failed decompression is counted, the copy is not failed
  })

  it('merges notes when several variants of one layer pass through', async () => {
    const { cacheDir, dest } = await setup()
    const z = await zstd(tar)
    await put(dest, gz)
    await put(dest, z)
    const lines = (await readFile(join(cacheDir, `${diffID}.compressed`), 'utf8')).split('\n').sort()
    expect(lines).toEqual([`${digestOf(gz)} gzip`, `${digestOf(z)} zstd`].sort())
  })

  it('keeps nothing when the bytes do not match the digest, and the inner destination fails', async () => {
    const { cacheDir, dest } = await setup()
    const wrong = { digest: digestOf(Buffer.from('something else')), size: gz.length }
    await expect(dest.putBlob(Readable.from([gz]), wrong)).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
    expect(await entries(cacheDir)).toEqual([])
  })

  it.each(['putBlob', 'putBlobFromFile'] as const)(
    'keeps nothing when the inner destination fails even though the bytes are right (inner %s)',
    async (method) => {
      const { cacheDir, cache } = await setup()
      const inner = await cache.inner.newImageDestination()
      if (method === 'putBlob') {
        inner.putBlobFromFile = undefined
        inner.putBlob = async (stream) => {
          await readAll(stream)
          throw new Error('inner refuses')
        }
      } else {
        inner.putBlobFromFile = async () => {
          throw new Error('inner refuses')
        }
      }
      const dest = new BlobCacheDestination(cache, inner, new Counters())
      await expect(dest.putBlob(Readable.from([gz]), info(gz))).rejects.toThrow('inner refuses')
      expect(await entries(cacheDir)).toEqual([])
    },
  )

  it('writes a blob once for a destination with putBlobFromFile: entry and file share an inode, stamped', async () => {
    const { cacheDir, dest, root } = await setup()
    const c = digestOf(gz)
    const streamed = countInnerPuts(dest)
    expect(await put(dest, gz)).toMatchObject({ digest: c, size: gz.length })
    expect(streamed.count).toBe(0)
    const entry = await stat(join(cacheDir, c))
    const file = await stat(join(root, 'image', c.slice(7)))
    expect(file.ino).toBe(entry.ino)
    expect(entry.nlink).toBe(2)
    expect(await readFile(join(root, 'image', c.slice(7)))).toEqual(gz)
    expect(await hasVerifiedStamp(join(cacheDir, c))).toBe(true)
    expect(await entries(cacheDir)).toEqual([c, `${c}.decompressed`, diffID, `${diffID}.compressed`].sort())
  })

  it('gives the destination the bytes from the open file when the temporary file leaves its path', async () => {
    const { cacheDir, cache, root } = await setup()
    const inner = await cache.inner.newImageDestination()
    const realFromFile = inner.putBlobFromFile!.bind(inner)
    inner.putBlobFromFile = async (path, i, o) => {
      await rm(path) // as a cache clear running meanwhile would
      return realFromFile(path, i, o)
    }
    const dest = new BlobCacheDestination(cache, inner, new Counters())
    expect(await put(dest, gz)).toMatchObject({ digest: digestOf(gz) })
    expect(await readFile(join(root, 'image', digestOf(gz).slice(7)))).toEqual(gz)
    expect(await entries(cacheDir)).not.toContain(digestOf(gz))
    expect((await entries(cacheDir)).filter((n) => n.startsWith('.tmp-'))).toEqual([])
  })

  it('keeps nothing when the source stream fails midway', async () => {
    const { cacheDir, dest } = await setup()
    async function* broken() {
      yield gz.subarray(0, 100)
      throw new Error('network reset')
    }
    await expect(dest.putBlob(Readable.from(broken()), info(gz))).rejects.toThrow('network reset')
    expect(await entries(cacheDir)).toEqual([])
  })

  it('an abort rejects with the reason and leaves no temporary files', async () => {
    const { cacheDir, dest } = await setup()
    const ac = new AbortController()
    const reason = new Error('stop')
    async function* slow() {
      yield gz.subarray(0, 100)
      ac.abort(reason)
      await new Promise((r) => setTimeout(r, 20))
      yield gz.subarray(100)
    }
    await expect(dest.putBlob(Readable.from(slow()), info(gz), { signal: ac.signal })).rejects.toBe(reason)
    expect(await entries(cacheDir)).toEqual([])
  })

  it('passes a blob without digest through and caches nothing', async () => {
    const { cacheDir, dest } = await setup()
    const stored = await dest.putBlob(Readable.from([gz]), { size: -1 })
    expect(stored.digest).toBe(digestOf(gz))
    expect(await entries(cacheDir)).toEqual([])
  })

  it('rejects an invalid digest before reading anything and writes no file', async () => {
    const { cacheDir, dest } = await setup()
    const stream = Readable.from([gz])
    await expect(dest.putBlob(stream, { digest: 'sha256:../../etc' as Digest, size: -1 })).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
    expect(await entries(cacheDir)).toEqual([])
  })

  it('does not rewrite an entry already present', async () => {
    const { cacheDir, dest } = await setup()
    await put(dest, tar)
    const before = await stat(join(cacheDir, diffID))
    await put(dest, tar)
    const after = await stat(join(cacheDir, diffID))
    expect(after.ino).toBe(before.ino)
    expect(await entries(cacheDir)).toEqual([diffID])
  })

  it('replaces an entry of the wrong size', async () => {
    const { cacheDir, dest } = await setup()
    await writeFile(join(cacheDir, diffID), tar.subarray(0, 100))
    await put(dest, tar)
    expect(await readFile(join(cacheDir, diffID))).toEqual(tar)
  })

  it('stores the manifest under its digest and forwards it', async () => {
    const { cacheDir, dest, root } = await setup()
    const manifest = Buffer.from(JSON.stringify({ schemaVersion: 2, mediaType: MediaType.ociManifest, config: {}, layers: [] }))
    await dest.putManifest(manifest)
    await dest.commit()
    expect(await readFile(join(cacheDir, digestOf(manifest)))).toEqual(manifest)
    expect(await readFile(join(root, 'image', 'manifest.json'))).toEqual(manifest)
  })
})

describe('BlobCacheDestination: cache failures never fail the copy', () => {
  it('counts a missing cache directory as an error and stores the blob', async () => {
    const root = await testDir()
    const cache = new BlobCache(new DirReference(join(root, 'image')), join(root, 'missing'))
    const dest = await cache.newImageDestination()
    expect((await put(dest, gz)).digest).toBe(digestOf(gz))
    await dest.putManifest(Buffer.from('{}'))
    expect(cache.stats.errors).toBe(2)
    expect(await readFile(join(root, 'image', digestOf(gz).slice(7)))).toEqual(gz)
  })

  it('counts a file standing where the directory should be', async () => {
    const root = await testDir()
    await writeFile(join(root, 'file'), 'not a directory')
    const cache = new BlobCache(new DirReference(join(root, 'image')), join(root, 'file'))
    const dest = await cache.newImageDestination()
    expect((await put(dest, tar)).digest).toBe(diffID)
    expect(cache.stats.errors).toBe(1)
  })

  it.skipIf(process.getuid?.() === 0)('counts a read-only cache directory (non-root only)', async () => {
    const { cacheDir, cache, dest } = await setup()
    await chmod(cacheDir, 0o555)
    try {
      expect((await put(dest, gz)).digest).toBe(digestOf(gz))
      expect(cache.stats.errors).toBe(1)
    } finally {
      await chmod(cacheDir, 0o755)
    }
  })

  it.skipIf(!canMountTmpfs()).each([
    ['64k', 256 << 10],
    ['1m', 3 << 20], // written with direct I/O, failing midway
  ])('counts a full disk (ENOSPC on a tmpfs of %s) and still stores the blob', async (tmpfsSize, layerBytes) => {
    const root = await testDir()
    const cacheDir = join(root, 'cache')
    await mkdir(cacheDir)
    execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${tmpfsSize}`, 'tmpfs', cacheDir])
    try {
      const big = makeLayer([{ name: 'big', content: randomBytes(layerBytes) }])
      const cache = new BlobCache(new DirReference(join(root, 'image')), cacheDir)
      const dest = await cache.newImageDestination()
      expect((await put(dest, big)).digest).toBe(digestOf(big))
      expect(cache.stats.errors).toBe(1)
      expect(await entries(cacheDir)).toEqual([])
      expect((await readFile(join(root, 'image', digestOf(big).slice(7)))).equals(big)).toBe(true)
    } finally {
      execFileSync('umount', [cacheDir])
    }
  })
})

describe('BlobCacheDestination.tryReusingBlob', () => {
  it('asks the inner destination first, then stores the cached file there', async () => {
    const { cacheDir, root } = await setup()
    await writeFile(join(cacheDir, diffID), tar)
    const cache = new BlobCache(new DirReference(join(root, 'other')), cacheDir)
    const dest = await cache.newImageDestination()
    const reused = await dest.tryReusingBlob(info(tar))
    expect(reused).toMatchObject({ digest: diffID, size: tar.length })
    expect(await readFile(join(root, 'other', diffID.slice(7)))).toEqual(tar)
    expect(cache.stats.hits).toBe(1)
    // now the inner destination has it: answered without the cache
    expect(await dest.tryReusingBlob(info(tar))).toMatchObject({ digest: diffID })
    expect(cache.stats.hits).toBe(1)
  })

  it('uses the inner putBlob when it has no putBlobFromFile, and a wrong-size entry is a miss and removed', async () => {
    const store = new MemoryStore()
    const t = memoryTransport(store)
    const root = await testDir()
    await writeFile(join(root, diffID), tar)
    const cache = new BlobCache(t.parseReference('img'), root)
    const dest = await cache.newImageDestination()
    expect(dest.putBlobFromFile).toBeUndefined()
    expect(await dest.tryReusingBlob({ digest: diffID, size: tar.length + 1 })).toBeUndefined()
    expect(await entries(root)).toEqual([])
    await writeFile(join(root, diffID), tar)
    expect(await dest.tryReusingBlob({ digest: diffID, size: -1 })).toMatchObject({ digest: diffID, size: tar.length })
    expect(store.puts).toEqual([diffID])
  })

  it('removes a corrupt entry the inner destination rejects and resolves undefined', async () => {
    const root = await testDir()
    const corrupt = Buffer.from(tar)
    corrupt[600] ^= 0xff
    await writeFile(join(root, diffID), corrupt)
    const cache = new BlobCache(memoryTransport(new MemoryStore()).parseReference('img'), root)
    const dest = await cache.newImageDestination()
    expect(await dest.tryReusingBlob(info(tar))).toBeUndefined()
    expect(await entries(root)).toEqual([])
    expect(cache.stats.errors).toBe(1)
  })
})

describe('BlobCacheDestination: optional methods', () => {
  it('has putSignatures and putBlobFromFile only when the inner destination has them', async () => {
    const root = await testDir()
    const bare = new BlobCache(memoryTransport(new MemoryStore(), { signatures: false }).parseReference('x'), root)
    const d1 = await bare.newImageDestination()
    expect(d1.putSignatures).toBeUndefined()
    expect(d1.putBlobFromFile).toBeUndefined()
    const dir = new BlobCache(new DirReference(join(root, 'img')), root)
    const d2 = await dir.newImageDestination()
    expect(typeof d2.putSignatures).toBe('function')
    expect(typeof d2.putBlobFromFile).toBe('function')
  })

  it('putBlobFromFile forwards and caches the file (verified)', async () => {
    const { cacheDir, dest, root } = await setup()
    const file = join(root, 'layer.gz')
    await writeFile(file, gz)
    await dest.putBlobFromFile!(file, info(gz))
    const c = digestOf(gz)
    expect(await entries(cacheDir)).toEqual([c, `${c}.decompressed`, diffID, `${diffID}.compressed`].sort())
    // a file that does not match its digest is not cached, even though the dir: destination,
    // trusting the putBlobFromFile contract, copies it without hashing
    await writeFile(file, 'garbage')
    const wrong = info(Buffer.from('x'))
    await dest.putBlobFromFile!(file, { ...wrong, size: -1 })
    expect(await entries(cacheDir)).toHaveLength(4)
  })

  it('forwards the rest to the inner destination', async () => {
    const { dest } = await setup()
    expect(dest.supportedManifestMIMETypes()).toBeUndefined()
    expect(dest.desiredLayerCompression()).toBe('preserve')
    expect(dest.acceptsImageLists()).toBe(true)
  })
})

describe('BlobCacheDestination.putBlobFromLocalFile (a source\'s own file, read on a thread)', () => {
  // larger than the thread's threshold and than one progress step, with a tail no multiple of a page
  const bigTar = makeLayer([{ name: 'noise', content: randomBytes(5 << 20) }, { name: 'text', content: 'words '.repeat(400_000) }])
  const bigGz = gzipSync(bigTar)
  const bigDiffID = digestOf(bigTar)

  async function localSetup(bytes: Buffer, mode: 'preserve' | 'compress' = 'preserve') {
    const s = await setup(mode)
    const file = join(s.root, 'source-blob')
    await writeFile(file, bytes)
    return { ...s, file }
  }

  it('stores the blob in the destination and the cache, with its decompressed form and notes, from one reading', async () => {
    const { cacheDir, dest, root, file } = await localSetup(bigGz)
    const streamed = countInnerPuts(dest)
    const progress: number[] = []
    const c = digestOf(bigGz)
    expect(await dest.putBlobFromLocalFile!(file, info(bigGz), { onProgress: (n) => progress.push(n) })).toMatchObject({ digest: c, size: bigGz.length })
    expect(streamed.count).toBe(0)
    expect(progress.length).toBeGreaterThan(0)
    expect(await entries(cacheDir)).toEqual([c, `${c}.decompressed`, bigDiffID, `${bigDiffID}.compressed`].sort())
    expect(digestOf(await readFile(join(cacheDir, bigDiffID)))).toBe(bigDiffID)
    expect(await readFile(join(cacheDir, `${c}.decompressed`), 'utf8')).toBe(bigDiffID)
    expect(await hasVerifiedStamp(join(cacheDir, c))).toBe(true)
    const entry = await stat(join(cacheDir, c))
    expect((await stat(join(root, 'image', c.slice(7)))).ino).toBe(entry.ino)
    expect((await readFile(file)).equals(bigGz)).toBe(true) // only read
    expect((dest.reference as BlobCache).stats.errors).toBe(0)
  })

  it('copies large uncompressed and zstd layers the same way, and streams small blobs and configs through putBlob', async () => {
    const plain = Buffer.concat([bigTar, Buffer.alloc(1000)])
    for (const [bytes, isConfig] of [[plain, false], [gz, false], [Buffer.from('{"config":1}'), true], [await zstd(bigTar), false]] as const) {
      const { cacheDir, dest, root, file } = await localSetup(bytes)
      const d = digestOf(bytes)
      const progress: number[] = []
      await dest.putBlobFromLocalFile!(file, info(bytes), { isConfig, onProgress: (n) => progress.push(n) })
      // the thread tells every 4 MiB, the stream every chunk
      if (bytes.length >= 4 << 20) expect(progress.length).toBeGreaterThan(0)
      expect(progress.every((n) => n <= bytes.length)).toBe(true)
      expect((await readFile(join(root, 'image', d.slice(7)))).equals(bytes)).toBe(true)
      expect(await entries(cacheDir)).toContain(isConfig ? `${d}.config` : d)
      expect((await entries(cacheDir)).filter((n) => n.startsWith('.tmp-'))).toEqual([])
    }
  })

  it.each([
    ['bytes that do not match the digest', (b: Buffer) => ({ ...info(b), digest: digestOf(Buffer.from('other')) }), 'DIGEST_INVALID'],
    ['a size other than the file\'s', (b: Buffer) => info(b, { size: b.length + 1 }), 'SIZE_INVALID'],
  ])('%s: fails like putBlob, and keeps nothing in the cache or the destination', async (_name, wrong, code) => {
    const { cacheDir, dest, root, file } = await localSetup(bigGz)
    await expect(dest.putBlobFromLocalFile!(file, wrong(bigGz))).rejects.toMatchObject({ code })
    expect(await entries(cacheDir)).toEqual([])
    expect((await readdir(join(root, 'image'))).filter((n) => !n.startsWith('.tmp-') && n !== 'version')).toEqual([])
  })

  it('a missing file is BLOB_UNKNOWN', async () => {
    const { dest, root } = await localSetup(bigGz)
    await expect(dest.putBlobFromLocalFile!(join(root, 'nothing'), info(bigGz))).rejects.toMatchObject({ code: 'BLOB_UNKNOWN' })
  })

  it('a cache that cannot be written is counted once, and the destination still gets the blob (verified)', async () => {
    const { cacheDir, cache, dest, root, file } = await localSetup(bigGz)
    await rm(cacheDir, { recursive: true })
    const c = digestOf(bigGz)
    await dest.putBlobFromLocalFile!(file, info(bigGz))
    expect((await readFile(join(root, 'image', c.slice(7)))).equals(bigGz)).toBe(true)
    expect(cache.stats.errors).toBe(1)
    // and without a cache, bytes that do not match still fail
    await writeFile(file, Buffer.concat([bigGz.subarray(0, 100), Buffer.alloc(100)]))
    await expect(dest.putBlobFromLocalFile!(file, info(bigGz, { size: -1 }))).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
  })

  it('an abort rejects with its reason and leaves no temporary file', async () => {
    const { cacheDir, dest, file } = await localSetup(bigGz)
    const ac = new AbortController()
    const putting = dest.putBlobFromLocalFile!(file, info(bigGz), { signal: ac.signal, onProgress: () => ac.abort(new Error('stop here')) })
    await expect(putting).rejects.toThrow('stop here')
    expect(await entries(cacheDir)).toEqual([])
  })

  it('a stream of a local file opened while the copy is aborted rejects, and leaves no error unheard', async () => {
    const { file } = await localSetup(gz)
    const unheard: unknown[] = []
    const onUncaught = (err: unknown) => unheard.push(err)
    process.on('uncaughtException', onUncaught)
    try {
      for (const onProgress of [undefined, () => {}]) {
        const ac = new AbortController()
        const opening = openLocalBlob(file, info(gz), { signal: ac.signal, onProgress })
        ac.abort(new Error('stop')) // while the file is being opened
        await expect(opening).rejects.toThrow('stop')
      }
      // an abort after the opening reaches whoever reads the stream, and nobody else
      const ac = new AbortController()
      const stream = await openLocalBlob(file, info(gz), { signal: ac.signal })
      ac.abort(new Error('later'))
      await new Promise((resolve) => setTimeout(resolve, 20))
      expect((await readAll(stream)).equals(gz)).toBe(true)
    } finally {
      process.off('uncaughtException', onUncaught)
    }
    expect(unheard).toEqual([])
  })

  it('exists only when the inner destination has putBlobFromFile', async () => {
    const root = await testDir()
    const bare = new BlobCache(memoryTransport(new MemoryStore()).parseReference('x'), root)
    expect((await bare.newImageDestination()).putBlobFromLocalFile).toBeUndefined()
  })
})

describe('BlobCacheDestination in compress mode', () => {
  it.each(['gzip', 'zstd'] as const)('makes the %s variant of an uncompressed layer in the background, with notes', async (alg) => {
    const { cacheDir, dest } = await setup('compress', { compressAlgorithm: alg })
    await put(dest, tar, { mediaType: MediaType.ociLayer })
    await dest.close()
    const names = await entries(cacheDir)
    expect(names).toHaveLength(4)
    const variant = names.find((n) => !n.includes('.') && n !== diffID) as Digest
    expect(names).toEqual([diffID, `${diffID}.compressed`, variant, `${variant}.decompressed`].sort())
    const note = await readFile(join(cacheDir, `${diffID}.compressed`), 'utf8')
    expect(note).toBe(alg === 'gzip' ? variant : `${variant} zstd`)
    expect(digestOf(await readFile(join(cacheDir, variant)))).toBe(variant)
  })

  it('makes the missing variant of an already cached layer that passes through again', async () => {
    const { cacheDir, cache } = await setup('compress', { compressAlgorithm: 'gzip' })
    const first = await cache.newImageDestination()
    await put(first, tar)
    await first.close()
    const zcache = new BlobCache(cache.inner, cacheDir, 'compress', { compressAlgorithm: 'zstd' })
    const second = await zcache.newImageDestination()
    await put(second, tar)
    await second.close()
    const note = await readFile(join(cacheDir, `${diffID}.compressed`), 'utf8')
    expect(note.split('\n').map((l) => l.split(' ')[1]).sort()).toEqual(['gzip', 'zstd'])
    expect(await entries(cacheDir)).toHaveLength(6)
  })

  it('makes no variant of a config or of a compressed layer', async () => {
    const { cacheDir, dest } = await setup('compress')
    await put(dest, Buffer.from('{}'), {}, true)
    await put(dest, gz)
    await dest.close()
    expect(await entries(cacheDir)).toHaveLength(5)
  })
})

