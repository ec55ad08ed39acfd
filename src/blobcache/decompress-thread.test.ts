import { randomBytes } from 'node:crypto'
import { availableParallelism } from 'node:os'
import { mkdir, readdir, readFile, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { setTimeout as sleep } from 'node:timers/promises'
import { Readable } from 'node:stream'
import { crc32, deflateRawSync, gunzipSync, gzipSync } from 'node:zlib'
import { describe, expect, it } from 'vitest'
import { readAll, testDir } from '../../test/helpers/conformance.js'
import { compressStream } from '../compression.js'
import { digestOf } from '../digest.js'
import { setIdleLimit, stopIdleThreads } from '../io/script-worker.js'
import { FileCopyError, PIECE_BYTES, copyFileOnThread, decompressionThreads, threadDecompression } from './decompress-thread.js'

/** Resolves once `done()` holds, checked every 20 ms; fails after 5 s. */
async function until(done: () => boolean): Promise<void> {
  for (let waited = 0; !done(); waited += 20) {
    if (waited >= 5000) throw new Error('still not done after 5 s')
    await sleep(20)
  }
}

const chunks = (data: Buffer, n: number) => Array.from({ length: Math.ceil(data.length / n) }, (_, i) => data.subarray(i * n, (i + 1) * n))

async function run(dir: string, input: Buffer, pieceBytes: number, algorithm: 'gzip' | 'zstd' = 'gzip') {
  const errors: unknown[] = []
  const job = threadDecompression(dir, 'sha256:base', (_what, err) => errors.push(err), algorithm)!
  expect(job).toBeDefined()
  expect(job.algorithm).toBe(algorithm)
  for (const c of chunks(input, pieceBytes)) await job.write(c)
  job.end()
  return { file: await job.done, errors }
}

/** The input given in small pieces, and in chunks larger than a piece. */
const PIECE_SIZES: [string, number][] = [
  ['small pieces', 1000],
  ['chunks larger than a piece', PIECE_BYTES + 12345],
]

describe('decompression thread (gzip)', () => {
  it.each(PIECE_SIZES)('writes the decompressed bytes and their sha256 to a temporary file (%s)', async (_name, pieceBytes) => {
    const dir = await testDir()
    // two members, as concatenated gzip files are; partly compressible, partly not
    const plain = Buffer.concat([Buffer.alloc(3 << 20, 'a'), randomBytes(1 << 20), Buffer.from('tail')])
    const input = Buffer.concat([gzipSync(plain.subarray(0, 2 << 20)), gzipSync(plain.subarray(2 << 20))])
    const { file, errors } = await run(dir, input, pieceBytes)
    expect(errors).toEqual([])
    expect(file?.digest).toBe(digestOf(plain))
    expect(file?.tmp.startsWith(dir)).toBe(true)
    expect(digestOf(await readFile(file!.tmp))).toBe(digestOf(plain))
  })

  it('writes the same file through the page cache when BLOBCACHE_DIRECT_IO=0 (shared with the thread)', async () => {
    const plain = Buffer.concat([randomBytes(1 << 20), Buffer.alloc(1 << 20, 'b'), Buffer.from('end')])
    const input = gzipSync(plain)
    const files: Buffer[] = []
    for (const setting of ['0', undefined]) {
      if (setting === undefined) delete process.env.BLOBCACHE_DIRECT_IO
      else process.env.BLOBCACHE_DIRECT_IO = setting
      try {
        const { file, errors } = await run(await testDir(), input, 100_000)
        expect(errors).toEqual([])
        expect(file?.digest).toBe(digestOf(plain))
        files.push(await readFile(file!.tmp))
      } finally {
        delete process.env.BLOBCACHE_DIRECT_IO
      }
    }
    expect(files[0].equals(plain)).toBe(true)
    expect(files[1].equals(plain)).toBe(true)
  })

  it('runs several jobs at once, on up to one thread per core', async () => {
    const dir = await testDir()
    const plains = [0, 1, 2, 3].map(() => Buffer.concat([randomBytes(700_000), Buffer.alloc(3 << 20, 'x')]))
    const results = await Promise.all(plains.map((p) => run(dir, gzipSync(p), 100_000)))
    expect(results.map((r) => r.file?.digest)).toEqual(plains.map((p) => digestOf(p)))
    expect((await readdir(dir)).length).toBe(4)
    expect(decompressionThreads()).toBe(Math.min(4, availableParallelism()))
  })

  it('stops quietly on corrupt data: reported once, no file left, writes still resolve', async () => {
    const dir = await testDir()
    const good = gzipSync(randomBytes(2 << 20))
    const bad = Buffer.concat([good.subarray(0, 1000), randomBytes(3 << 20)])
    const { file, errors } = await run(dir, bad, 256 << 10)
    expect(file).toBeUndefined()
    expect(errors).toHaveLength(1)
    expect(await readdir(dir)).toEqual([])
  })

  it('an abort leaves no file and reports nothing', async () => {
    const dir = await testDir()
    const errors: unknown[] = []
    const job = threadDecompression(dir, 'sha256:base', (_w, err) => errors.push(err))!
    const input = gzipSync(randomBytes(4 << 20))
    await job.write(input.subarray(0, 2 << 20))
    job.abort()
    await job.write(input.subarray(2 << 20))
    expect(await job.done).toBeUndefined()
    expect(errors).toEqual([])
    expect(await readdir(dir)).toEqual([])
  })

  it('a missing directory is a failure reported once', async () => {
    const dir = await testDir()
    const { file, errors } = await run(`${dir}/missing`, gzipSync(Buffer.from('x')), 10)
    expect(file).toBeUndefined()
    expect(errors).toHaveLength(1)
  })
})

// A gzip member written by hand (RFC 1952), with the optional header fields the thread must skip.
function member(plain: Buffer, fields: { extra?: Buffer; name?: string; comment?: string; headerCrc?: boolean } = {}): Buffer {
  const flags = (fields.headerCrc ? 2 : 0) | (fields.extra ? 4 : 0) | (fields.name !== undefined ? 8 : 0) | (fields.comment !== undefined ? 16 : 0)
  const parts: Buffer[] = [Buffer.from([0x1f, 0x8b, 8, flags, 1, 2, 3, 4, 0, 3])]
  if (fields.extra) parts.push(Buffer.from([fields.extra.length & 0xff, fields.extra.length >> 8]), fields.extra)
  if (fields.name !== undefined) parts.push(Buffer.from(`${fields.name}\0`, 'latin1'))
  if (fields.comment !== undefined) parts.push(Buffer.from(`${fields.comment}\0`, 'latin1'))
  if (fields.headerCrc) {
    const crc = Buffer.alloc(2)
    crc.writeUInt16LE(crc32(Buffer.concat(parts)) & 0xffff)
    parts.push(crc)
  }
  const trailer = Buffer.alloc(8)
  trailer.writeUInt32LE(crc32(plain), 0)
  trailer.writeUInt32LE(plain.length % 2 ** 32, 4)
  return Buffer.concat([...parts, deflateRawSync(plain), trailer])
}

/** What Node's own gunzip makes of input: the bytes, or the error's code. */
function nodeGunzip(input: Buffer): { plain: Buffer } | { code: string } {
  try {
    return { plain: gunzipSync(input) }
  } catch (err) {
    return { code: (err as NodeJS.ErrnoException).code! }
  }
}

describe('file jobs: a local file copied, hashed and gunzipped by the thread', () => {
  // a layer larger than a stage, with a tail that is no multiple of the alignment
  const plain = Buffer.concat([randomBytes(1_500_000), Buffer.alloc(2 << 20, 'z'), Buffer.from('the end')])
  const layer = gzipSync(plain)
  const hexOf = (b: Buffer, alg = 'sha256') => digestOf(b, alg as 'sha256').split(':')[1]

  async function source(bytes: Buffer): Promise<{ dir: string; path: string }> {
    const dir = await testDir()
    const path = join(dir, 'source')
    await writeFile(path, bytes)
    return { dir, path }
  }

  it.each([
    ['with O_DIRECT', true],
    ['through the page cache', false],
  ])('copies the file with its digest and size, and the decompressed file with its own (%s)', async (_name, direct) => {
    const { dir, path } = await source(layer)
    const progress: number[] = []
    const spec = { source: path, size: layer.length, copy: join(dir, '.tmp-copy'), algorithm: 'sha256' as const, direct, out: join(dir, '.tmp-out') }
    const result = await copyFileOnThread(spec, { onProgress: (n) => progress.push(n) })!
    expect(result.hex).toBe(hexOf(layer))
    expect(result.bytes).toBe(layer.length)
    expect(result.out).toEqual({ hex: hexOf(plain), bytes: plain.length })
    expect((await readFile(spec.copy)).equals(layer)).toBe(true)
    expect((await readFile(spec.out)).equals(plain)).toBe(true)
    expect((await readFile(path)).equals(layer)).toBe(true) // only read
    expect(progress.length === 0 || progress.every((n) => n > 0 && n <= layer.length)).toBe(true)
  })

  it('hashes with the digest\'s algorithm and copies a file it does not gunzip', async () => {
    const big = randomBytes((5 << 20) + 3)
    const { dir, path } = await source(big)
    const progress: number[] = []
    const result = await copyFileOnThread(
      { source: path, size: -1, copy: join(dir, '.tmp-copy'), algorithm: 'sha512', direct: true },
      { onProgress: (n) => progress.push(n) },
    )!
    expect(result).toEqual({ hex: hexOf(big, 'sha512'), bytes: big.length })
    expect((await readFile(join(dir, '.tmp-copy'))).equals(big)).toBe(true)
    expect(progress[0]).toBe(4 << 20)
  })

  it('a file of another size than expected fails SIZE_INVALID on the source side and leaves no file', async () => {
    for (const size of [layer.length - 1, layer.length + 1]) {
      const { dir, path } = await source(layer)
      const spec = { source: path, size, copy: join(dir, '.tmp-copy'), algorithm: 'sha256' as const, direct: true, out: join(dir, '.tmp-out') }
      const err = await copyFileOnThread(spec)!.catch((e: unknown) => e)
      expect(err).toBeInstanceOf(FileCopyError)
      expect(err).toMatchObject({ side: 'source', code: 'SIZE_INVALID' })
      expect((await readdir(dir)).sort()).toEqual(['source'])
    }
  })

  it('a missing source fails on the source side; a copy that cannot be created on the cache side', async () => {
    const { dir, path } = await source(layer)
    const missing = await copyFileOnThread({ source: join(dir, 'nothing'), size: -1, copy: join(dir, '.tmp-a'), algorithm: 'sha256', direct: true })!.catch((e: unknown) => e)
    expect(missing).toMatchObject({ side: 'source', code: 'ENOENT' })
    const noDir = await copyFileOnThread({ source: path, size: -1, copy: join(dir, 'gone', '.tmp-b'), algorithm: 'sha256', direct: true, out: join(dir, '.tmp-c') })!.catch((e: unknown) => e)
    expect(noDir).toMatchObject({ side: 'cache', code: 'ENOENT' })
    expect((await readdir(dir)).sort()).toEqual(['source'])
  })

  it('a directory as the source is refused', async () => {
    const { dir } = await source(layer)
    await mkdir(join(dir, 'sub'))
    const err = await copyFileOnThread({ source: join(dir, 'sub'), size: -1, copy: join(dir, '.tmp-a'), algorithm: 'sha256', direct: true })!.catch((e: unknown) => e)
    expect(err).toMatchObject({ side: 'source' })
    expect((await readdir(dir)).sort()).toEqual(['source', 'sub'])
  })

  it('corrupt gzip loses only the decompressed file: the copy is made', async () => {
    const bad = Buffer.from(layer)
    bad.fill(0xff, 10, 20) // the first deflate block: reserved type 11
    const { dir, path } = await source(bad)
    const spec = { source: path, size: bad.length, copy: join(dir, '.tmp-copy'), algorithm: 'sha256' as const, direct: true, out: join(dir, '.tmp-out') }
    const result = await copyFileOnThread(spec)!
    expect(result.hex).toBe(hexOf(bad))
    expect(result.out && 'error' in result.out ? result.out.error.message : '').not.toBe('')
    expect((await readdir(dir)).sort()).toEqual(['.tmp-copy', 'source'])
  })

  it('a decompressed file that cannot be created loses only that file', async () => {
    const { dir, path } = await source(layer)
    const spec = { source: path, size: -1, copy: join(dir, '.tmp-copy'), algorithm: 'sha256' as const, direct: true, out: join(dir, 'gone', '.tmp-out') }
    const result = await copyFileOnThread(spec)!
    expect(result.hex).toBe(hexOf(layer))
    expect(result.out && 'error' in result.out ? (result.out.error as NodeJS.ErrnoException).code : '').toBe('ENOENT')
  })

  it('an abort rejects with its reason and leaves no file', async () => {
    const big = gzipSync(Buffer.concat([randomBytes(6 << 20), Buffer.alloc(8 << 20, 'q')]), { level: 1 })
    const { dir, path } = await source(big)
    for (const when of [0, 1]) {
      const ac = new AbortController()
      const copy = copyFileOnThread(
        { source: path, size: big.length, copy: join(dir, `.tmp-copy${when}`), algorithm: 'sha256', direct: true, out: join(dir, `.tmp-out${when}`) },
        { signal: ac.signal, onProgress: () => ac.abort(new Error('stop')) },
      )!
      if (when === 0) ac.abort(new Error('stop'))
      await expect(copy).rejects.toThrow('stop')
      expect((await readdir(dir)).sort()).toEqual(['source'])
    }
  })
})

describe('decompression thread (zstd)', () => {
  const zstd = (data: Buffer) => readAll(Readable.from([data]).pipe(compressStream('zstd')))
  // a skippable frame, as zstd:chunked puts between and after the frames it writes
  const skippable = (payload: Buffer) => {
    const head = Buffer.alloc(8)
    head.writeUInt32LE(0x184d2a50, 0)
    head.writeUInt32LE(payload.length, 4)
    return Buffer.concat([head, payload])
  }

  it.each(PIECE_SIZES)('decompresses frames one after another, skippable ones skipped, output larger than a stage (%s)', async (_name, pieceBytes) => {
    const dir = await testDir()
    // compresses to far less than it decompresses to: one piece makes several stages of output
    const plain = Buffer.concat([Buffer.alloc(3 << 20, 'a'), randomBytes(1 << 20), Buffer.from('tail')])
    const input = Buffer.concat([await zstd(plain.subarray(0, 2 << 20)), skippable(Buffer.from('chunked toc')), await zstd(plain.subarray(2 << 20)), skippable(Buffer.alloc(0))])
    const { file, errors } = await run(dir, input, pieceBytes, 'zstd')
    expect(errors).toEqual([])
    expect(file?.digest).toBe(digestOf(plain))
    expect((await readFile(file!.tmp)).equals(plain)).toBe(true)
  })

  it.each([
    ['cut in the middle of a frame', (z: Buffer) => z.subarray(0, z.length - 100)],
    ['followed by bytes that are no frame', (z: Buffer) => Buffer.concat([z, Buffer.from('garbage after the frame')])],
    ['corrupt inside a frame', (z: Buffer) => Buffer.concat([z.subarray(0, 20), Buffer.alloc(64, 0xff), z.subarray(84)])],
  ])('refuses a stream %s, reported once, no file left', async (_name, spoil) => {
    const dir = await testDir()
    const input = spoil(await zstd(Buffer.concat([randomBytes(200_000), Buffer.alloc(1 << 20, 'z')])))
    const { file, errors } = await run(dir, input, 64 << 10, 'zstd')
    expect(file).toBeUndefined()
    expect(errors).toHaveLength(1)
    expect((await readdir(dir)).filter((n) => n.startsWith('.tmp-'))).toEqual([])
  })

  it('a file job decompresses a zstd layer on the thread too', async () => {
    const dir = await testDir()
    const plain = Buffer.concat([randomBytes(1_500_000), Buffer.alloc(2 << 20, 'y')])
    const layer = await zstd(plain)
    await writeFile(join(dir, 'source'), layer)
    const spec = { source: join(dir, 'source'), size: layer.length, copy: join(dir, '.tmp-copy'), algorithm: 'sha256' as const, direct: true, out: join(dir, '.tmp-out'), decompress: 'zstd' as const }
    const result = await copyFileOnThread(spec)!
    expect(result.hex).toBe(digestOf(layer).slice(7))
    expect(result.out).toEqual({ hex: digestOf(plain).slice(7), bytes: plain.length })
    expect((await readFile(spec.out)).equals(plain)).toBe(true)
  })
})

describe('decompression thread: the gzip format (raw inflate, members parsed by the thread)', () => {
  const text = Buffer.from('layer bytes '.repeat(5000))
  const noise = randomBytes(40_000)
  const full = member(text, { extra: randomBytes(300), name: 'layer.tar', comment: 'a comment', headerCrc: true })
  const cases: [string, Buffer][] = [
    ['every optional header field', full],
    ['three members, one empty', Buffer.concat([member(text, { name: 'a' }), member(Buffer.alloc(0)), gzipSync(noise)])],
    ['zero bytes after the last member, then anything', Buffer.concat([gzipSync(text), Buffer.alloc(100), Buffer.from('ignored')])],
    ['an empty FEXTRA, FNAME and FCOMMENT', member(noise, { extra: Buffer.alloc(0), name: '', comment: '' })],
    ['bytes after a member that are not a member', Buffer.concat([gzipSync(text), Buffer.from('garbage')])],
    ['a second member with another method', Buffer.concat([gzipSync(text), Buffer.from([0x1f, 0x8b, 7, 0, 0, 0, 0, 0, 0, 3])])],
    ['reserved flag bits', Buffer.concat([Buffer.from([0x1f, 0x8b, 8, 0x20]), gzipSync(text).subarray(4)])],
    ['a wrong ISIZE', Buffer.concat([gzipSync(text).subarray(0, -1), Buffer.from([1])])],
    ['truncated in the header', full.subarray(0, 200)],
    ['truncated in the deflate data', full.subarray(0, full.length - 500)],
    ['truncated in the trailer', full.subarray(0, full.length - 3)],
    ['a member cut after its deflate data', gzipSync(noise).subarray(0, -8)],
    ['no bytes at all', Buffer.alloc(0)],
  ]

  it.each(cases)('reads %s as Node gunzip does, whatever the pieces', async (_name, input) => {
    const expected = nodeGunzip(input)
    for (const pieceBytes of [1, 7, 4093, PIECE_BYTES]) {
      // pieces of one byte only for the small inputs (each is a message to the thread)
      if (pieceBytes === 1 && input.length > 3000) continue
      const dir = await testDir()
      const { file, errors } = await run(dir, input, pieceBytes)
      if ('plain' in expected) {
        expect(errors).toEqual([])
        expect(file?.digest).toBe(digestOf(expected.plain))
        expect((await readFile(file!.tmp)).equals(expected.plain)).toBe(true)
      } else {
        expect(file).toBeUndefined()
        expect(errors.map((e) => (e as NodeJS.ErrnoException).code)).toEqual([expected.code])
        expect(await readdir(dir)).toEqual([])
      }
    }
  })

  it('does not compute the crc32 of the output: the blob\'s sha256 covers its bytes (Node gunzip refuses a wrong one)', async () => {
    const input = gzipSync(text)
    input.writeUInt32LE((input.readUInt32LE(input.length - 8) ^ 1) >>> 0, input.length - 8)
    expect(nodeGunzip(input)).toEqual({ code: 'Z_DATA_ERROR' })
    const { file, errors } = await run(await testDir(), input, 4093)
    expect(errors).toEqual([])
    expect(file?.digest).toBe(digestOf(text))
  })

  it('bytes cut at every place of a member: each cut is read, or refused, as Node gunzip does', async () => {
    const small = member(Buffer.from('0123456789'.repeat(30)), { extra: Buffer.from('xx'), name: 'n', comment: 'c', headerCrc: true })
    const dir = await testDir()
    for (let cut = 0; cut <= small.length; cut += 3) {
      const input = small.subarray(0, cut)
      const expected = nodeGunzip(input)
      const { file, errors } = await run(dir, input, 5)
      expect({ cut, ok: file !== undefined, codes: errors.map((e) => (e as NodeJS.ErrnoException).code) }).toEqual({
        cut,
        ok: 'plain' in expected,
        codes: 'plain' in expected ? [] : [expected.code],
      })
    }
  })
})

describe('the decompression thread and the process', () => {
  it('stopIdleThreads ends idle threads only; later layers get new threads, not the main thread', async () => {
    const dir = await testDir()
    const plain = Buffer.concat([randomBytes(500_000), Buffer.alloc(2 << 20, 'y')])
    const input = gzipSync(plain)
    expect((await run(dir, input, 100_000)).file?.digest).toBe(digestOf(plain))
    expect(decompressionThreads()).toBeGreaterThan(0)

    // a job under way keeps its thread
    const errors: unknown[] = []
    const busy = threadDecompression(dir, 'sha256:busy', (_what, err) => errors.push(err))!
    await busy.write(input.subarray(0, 1000))
    await stopIdleThreads()
    expect(decompressionThreads()).toBe(1)
    await busy.write(input.subarray(1000))
    busy.end()
    expect((await busy.done)?.digest).toBe(digestOf(plain))
    expect(errors).toEqual([])

    await stopIdleThreads()
    expect(decompressionThreads()).toBe(0)
    // a stop on purpose is no failure: the next layer is decompressed on a new thread
    const next = await run(dir, input, PIECE_BYTES + 1)
    expect(next.errors).toEqual([])
    expect(next.file?.digest).toBe(digestOf(plain))
    expect(decompressionThreads()).toBe(1)
    await stopIdleThreads()
  })

  it('a thread idle for longer than the limit ends by itself; one with a job under way does not', async () => {
    const previous = setIdleLimit(50)
    try {
      const dir = await testDir()
      const plain = Buffer.concat([randomBytes(300_000), Buffer.alloc(1 << 20, 'z')])
      const input = gzipSync(plain)
      const errors: unknown[] = []
      const busy = threadDecompression(dir, 'sha256:slow', (_what, err) => errors.push(err))!
      await busy.write(input.subarray(0, 5000))
      await sleep(300)
      expect(decompressionThreads()).toBe(1)
      await busy.write(input.subarray(5000))
      busy.end()
      expect((await busy.done)?.digest).toBe(digestOf(plain))
      expect(errors).toEqual([])
      // now idle: gone after the limit, and the next layer gets a new thread
      await until(() => decompressionThreads() === 0)
      const next = await run(dir, input, 70_000)
      expect(next.errors).toEqual([])
      expect(next.file?.digest).toBe(digestOf(plain))
      expect(decompressionThreads()).toBe(1)
      await until(() => decompressionThreads() === 0)
    } finally {
      setIdleLimit(previous)
    }
  })

  it('a process that decompressed a layer on the thread exits by itself once done (the idle thread holds nothing)', async () => {
    const { spawn } = await import('node:child_process')
    const { resolve } = await import('node:path')
    const dist = resolve(__dirname, '../../dist/index.js')
    const dir = await testDir()
    const script = `
      import { mkdirSync } from 'node:fs'
      import { Readable } from 'node:stream'
      import { crc32, deflateRawSync, gunzipSync, gzipSync } from 'node:zlib'
      import { BlobCache, digestOf, dir } from ${JSON.stringify(dist)}
      mkdirSync(${JSON.stringify(`${dir}/cache`)})
      const cache = new BlobCache(dir.parseReference(${JSON.stringify(`${dir}/out`)}), ${JSON.stringify(`${dir}/cache`)})
      const dest = await cache.newImageDestination()
      const blob = gzipSync(Buffer.alloc(3 << 20, 'x'))
      await dest.putBlob(Readable.from([blob]), { digest: digestOf(blob), size: blob.length })
      await dest.close()
      process.stdout.write(JSON.stringify(cache.stats))
    `
    const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'pipe'] })
    let out = ''
    child.stdout.on('data', (d: Buffer) => (out += d))
    const exited = new Promise<number | null>((res) => child.on('close', (code) => res(code)))
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000)
    const code = await exited
    clearTimeout(timer)
    expect(code).toBe(0)
    expect(JSON.parse(out)).toEqual({ hits: 0, misses: 0, errors: 0 })
    // the layer was decompressed into its entry, with notes
    expect((await readdir(join(dir, 'cache'))).filter((f) => f.endsWith('.decompressed') || f.endsWith('.compressed'))).toHaveLength(2)
  })
})
