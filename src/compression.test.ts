import { execFileSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { readFile } from 'node:fs/promises'
import { PassThrough, Readable, type Transform } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { gzipSync } from 'node:zlib'
import { describe, expect, it, onTestFinished } from 'vitest'
import {
  DEFAULT_GZIP_LEVEL,
  compressStream,
  compressionAlgorithms,
  decompressStream,
  detectCompression,
  findExecutable,
  isCompressionAlgorithm,
  peekCompression,
} from './compression.js'
import { digestOf } from './digest.js'
import { ParallelGzip } from './io/parallel-gzip.js'

/** Compressible but not trivial: random words repeated with variation. */
function sample(bytes: number): Buffer {
  const words = Array.from({ length: 512 }, () => randomBytes(1 + (randomBytes(1)[0] % 12)).toString('hex'))
  const parts: string[] = []
  let n = 0
  while (n < bytes) {
    const w = words[Math.floor(Math.random() * words.length)] + ' '
    parts.push(w)
    n += w.length
  }
  return Buffer.from(parts.join('')).subarray(0, bytes)
}

async function collect(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = []
  for await (const c of stream) chunks.push(c as Buffer)
  return Buffer.concat(chunks)
}

/** Runs `input` through the transforms and returns the output. */
async function through(input: Buffer | Buffer[], ...transforms: Transform[]): Promise<Buffer> {
  const chunks: Buffer[] = []
  await pipeline(Readable.from(Array.isArray(input) ? input : [input]), ...(transforms as [Transform]), async (src: AsyncIterable<Buffer>) => {
    for await (const c of src) chunks.push(c)
  })
  return Buffer.concat(chunks)
}

/** A zstd skippable frame (magic 0x184D2A5n, little-endian length, payload). */
function skippableFrame(payload: Buffer, nibble = 0): Buffer {
  const head = Buffer.alloc(8)
  head.writeUInt32LE(0x184d2a50 + nibble, 0)
  head.writeUInt32LE(payload.length, 4)
  return Buffer.concat([head, payload])
}

const bzip2 = findExecutable('bzip2')
const xz = findExecutable('xz')
const zstdCli = findExecutable('zstd')

function tool(binary: string, args: string[], input: Buffer): Buffer {
  return execFileSync(binary, args, { input, maxBuffer: 1 << 30 })
}

function alive(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch {
    return false
  }
}

async function waitFor(cond: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms
  while (!cond()) {
    if (Date.now() > end) throw new Error('timed out')
    await new Promise((r) => setTimeout(r, 20))
  }
}

describe('detectCompression', () => {
  it.each([
    ['gzip', [0x1f, 0x8b, 0x08, 0x00]],
    ['zstd', [0x28, 0xb5, 0x2f, 0xfd, 0x00]],
    ['zstd', [0x50, 0x2a, 0x4d, 0x18, 0, 0, 0, 0]],
    ['zstd', [0x5f, 0x2a, 0x4d, 0x18]],
    ['bzip2', [0x42, 0x5a, 0x68, 0x39]],
    ['xz', [0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00, 0x00]],
  ])('recognises %s magic %j', (alg, bytes) => {
    expect(detectCompression(Buffer.from(bytes))).toBe(alg)
  })

  it.each([
    ['empty', []],
    ['short gzip', [0x1f, 0x8b]],
    ['gzip with another method', [0x1f, 0x8b, 0x07]],
    ['short xz', [0xfd, 0x37, 0x7a, 0x58, 0x5a]],
    ['lz4 frame', [0x04, 0x22, 0x4d, 0x18]],
    ['tar', [...Buffer.from('etc/passwd\0\0\0\0')]],
    ['json', [...Buffer.from('{"a":1}')]],
  ])('returns null for %s', (_name, bytes) => {
    expect(detectCompression(Buffer.from(bytes))).toBeNull()
  })

  it('recognises the output of real compressors', async () => {
    const data = sample(10_000)
    expect(detectCompression(gzipSync(data))).toBe('gzip')
    expect(detectCompression(await through(data, compressStream('gzip')))).toBe('gzip')
    expect(detectCompression(await through(data, compressStream('zstd')))).toBe('zstd')
    if (bzip2) expect(detectCompression(tool(bzip2, ['-c'], data))).toBe('bzip2')
    if (xz) expect(detectCompression(tool(xz, ['-c'], data))).toBe('xz')
    if (zstdCli) expect(detectCompression(tool(zstdCli, ['-c'], data))).toBe('zstd')
  })
})

describe('algorithm names', () => {
  it('lists and checks writable algorithms', () => {
    expect(compressionAlgorithms).toEqual(['gzip', 'zstd'])
    expect(isCompressionAlgorithm('gzip')).toBe(true)
    expect(isCompressionAlgorithm('zstd')).toBe(true)
    expect(isCompressionAlgorithm('xz')).toBe(false)
    expect(isCompressionAlgorithm('bzip2')).toBe(false)
    expect(isCompressionAlgorithm(undefined)).toBe(false)
  })
})

describe('peekCompression', () => {
  it('detects and keeps every byte of a long stream arriving a byte at a time at first', async () => {
    const compressed = gzipSync(sample(200_000))
    const pieces = [...compressed.subarray(0, 10)].map((b) => Buffer.from([b]))
    const src = Readable.from([...pieces, compressed.subarray(10)], { objectMode: false })
    const { algorithm, stream } = await peekCompression(src)
    expect(algorithm).toBe('gzip')
    expect(digestOf(await collect(stream))).toBe(digestOf(compressed))
  })

  it('works when the stream is then piped with pipeline', async () => {
    const data = sample(3 << 20)
    const compressed = await through(data, compressStream('zstd'))
    const { algorithm, stream } = await peekCompression(Readable.from([compressed.subarray(0, 5), compressed.subarray(5)]))
    expect(algorithm).toBe('zstd')
    const out: Buffer[] = []
    await pipeline(stream, decompressStream('zstd'), async (s: AsyncIterable<Buffer>) => {
      for await (const c of s) out.push(c)
    })
    expect(Buffer.concat(out).equals(data)).toBe(true)
  })

  it.each(['data', 'pipe'])('leaves the stream usable with .on(%s)', async (how) => {
    const data = sample(1 << 20)
    const src = new PassThrough()
    src.write(data.subarray(0, 3))
    setTimeout(() => src.end(data.subarray(3)), 5)
    const { algorithm, stream } = await peekCompression(src)
    expect(algorithm).toBeNull()
    const chunks: Buffer[] = []
    await new Promise<void>((resolve, reject) => {
      stream.on('error', reject)
      if (how === 'data') {
        stream.on('data', (c: Buffer) => chunks.push(c)).on('end', resolve)
      } else {
        const sink = new PassThrough()
        sink.on('data', (c: Buffer) => chunks.push(c)).on('end', resolve)
        stream.pipe(sink)
      }
    })
    expect(Buffer.concat(chunks).equals(data)).toBe(true)
  })

  it.each([0, 1, 3, 7, 8])('handles a stream of only %d bytes', async (n) => {
    const bytes = Buffer.from([0x1f, 0x8b, 0x08, 1, 2, 3, 4, 5]).subarray(0, n)
    const { algorithm, stream } = await peekCompression(Readable.from(n ? [bytes] : [], { objectMode: false }))
    expect(algorithm).toBe(n >= 3 ? 'gzip' : null)
    expect((await collect(stream)).equals(bytes)).toBe(true)
  })

  it('handles a stream that ended before the call', async () => {
    const src = Readable.from([Buffer.from('abc')], { objectMode: false })
    await collect(src)
    const { algorithm, stream } = await peekCompression(src)
    expect(algorithm).toBeNull()
    expect((await collect(stream)).length).toBe(0)
  })

  it('rejects with the error of a stream that fails before 8 bytes', async () => {
    const src = new PassThrough()
    src.write(Buffer.from([0x1f, 0x8b]))
    const boom = new Error('boom')
    setTimeout(() => src.destroy(boom), 10)
    await expect(peekCompression(src)).rejects.toBe(boom)
  })

  it('rejects when the stream is destroyed without an error', async () => {
    const src = new PassThrough()
    setTimeout(() => src.destroy(), 10)
    await expect(peekCompression(src)).rejects.toMatchObject({ code: 'ERR_STREAM_PREMATURE_CLOSE' })
  })
})

describe.each(compressionAlgorithms)('%s streams', (alg) => {
  it('round-trips data in many chunks', async () => {
    const data = sample(5 << 20)
    const chunks = Array.from({ length: 80 }, (_, i) => data.subarray(i * 65536, (i + 1) * 65536))
    const compressed = await through(chunks, compressStream(alg))
    expect(compressed.length).toBeLessThan(data.length)
    expect(detectCompression(compressed)).toBe(alg)
    expect(digestOf(await through(compressed, decompressStream(alg)))).toBe(digestOf(data))
  })

  it('round-trips empty input', async () => {
    const compressed = await through([], compressStream(alg))
    expect(compressed.length).toBeGreaterThan(0)
    expect((await through(compressed, decompressStream(alg))).length).toBe(0)
  })

  it('honours the level', async () => {
    // Real binary content: levels make a clear difference on it, unlike on random words.
    const data = (await readFile(process.execPath)).subarray(0, 1 << 20)
    const fast = await through(data, compressStream(alg, { level: 1 }))
    const best = await through(data, compressStream(alg, { level: 9 }))
    expect(best.length).toBeLessThan(fast.length)
    expect((await through(best, decompressStream(alg))).equals(data)).toBe(true)
  })

  it('rejects levels out of range with UNSUPPORTED', () => {
    expect(() => compressStream(alg, { level: 99 })).toThrow(expect.objectContaining({ code: 'UNSUPPORTED' }))
    expect(() => compressStream(alg, { level: 1.5 })).toThrow(expect.objectContaining({ code: 'UNSUPPORTED' }))
  })

  it('fails corrupt input with COMPRESSION_INVALID', async () => {
    const compressed = await through(sample(100_000), compressStream(alg))
    const broken = Buffer.from(compressed)
    broken.fill(0x55, 20, 200)
    await expect(through(broken, decompressStream(alg))).rejects.toMatchObject({ code: 'COMPRESSION_INVALID' })
  })

  it('fails truncated input with COMPRESSION_INVALID', async () => {
    const compressed = await through(sample(100_000), compressStream(alg))
    const cut = compressed.subarray(0, compressed.length - 10)
    await expect(through(cut, decompressStream(alg))).rejects.toMatchObject({ code: 'COMPRESSION_INVALID' })
  })

  it('does not wrap an abort', async () => {
    const ac = new AbortController()
    const reason = new Error('stop')
    const src = new PassThrough()
    src.write(sample(1000))
    const p = pipeline(src, compressStream(alg), new PassThrough(), { signal: ac.signal })
    setTimeout(() => ac.abort(reason), 10)
    await expect(p).rejects.toMatchObject({ name: 'AbortError', cause: reason })
  })
})

describe('gzip compression', () => {
  it('deflates in parallel blocks at level 4 by default, and in one zlib stream at level 0', async () => {
    const data = Buffer.concat([(await readFile(process.execPath)).subarray(0, 3 << 20), randomBytes(1 << 20)])
    const byDefault = await through(data, compressStream('gzip'))
    // the parallel writer's header: OS 255 (zlib writes the OS it runs on: 3 on Unix)
    expect(byDefault[9]).toBe(255)
    expect(byDefault.equals(await through(data, new ParallelGzip(DEFAULT_GZIP_LEVEL)))).toBe(true)
    expect(byDefault.equals(await through(data, compressStream('gzip', { level: -1 })))).toBe(true)
    expect(DEFAULT_GZIP_LEVEL).toBe(4)
    const stored = await through(data, compressStream('gzip', { level: 0 }))
    expect(stored[9]).not.toBe(255)
    for (const out of [byDefault, stored]) expect((await through(out, decompressStream('gzip'))).equals(data)).toBe(true)
  })
})

describe('multi-part input', () => {
  it('gunzip decodes several concatenated members', async () => {
    const a = sample(300_000)
    const b = sample(200_000)
    const joined = Buffer.concat([gzipSync(a), gzipSync(b), gzipSync(Buffer.alloc(0))])
    expect((await through(joined, decompressStream('gzip'))).equals(Buffer.concat([a, b]))).toBe(true)
  })

  it('zstd decodes independent frames and skips skippable frames', async () => {
    const a = sample(300_000)
    const b = sample(200_000)
    const frameA = await through(a, compressStream('zstd'))
    const frameB = await through(b, compressStream('zstd', { level: 7 }))
    const joined = Buffer.concat([
      skippableFrame(Buffer.from('leading metadata')),
      frameA,
      skippableFrame(Buffer.from('table of contents'), 0xe),
      frameB,
      skippableFrame(Buffer.alloc(0), 0xf),
    ])
    expect(detectCompression(joined)).toBe('zstd')
    // Split at awkward places so frames straddle chunks.
    const pieces = [joined.subarray(0, 5), joined.subarray(5, frameA.length + 3), joined.subarray(frameA.length + 3)]
    expect(digestOf(await through(pieces, decompressStream('zstd')))).toBe(digestOf(Buffer.concat([a, b])))
  })

  it.skipIf(!zstdCli)('zstd output is read by the zstd program and vice versa', async () => {
    const data = sample(1 << 20)
    const ours = await through(data, compressStream('zstd'))
    expect(tool(zstdCli!, ['-dc'], ours).equals(data)).toBe(true)
    const theirs = tool(zstdCli!, ['-c', '-19'], data)
    expect((await through(theirs, decompressStream('zstd'))).equals(data)).toBe(true)
  })
})

describe.each([
  ['bzip2', bzip2],
  ['xz', xz],
] as const)('%s via the system program', (alg, binary) => {
  it.skipIf(!binary)('decodes a file made by the program, in chunks', async () => {
    const data = sample(1200_000)
    const compressed = tool(binary!, ['-c'], data)
    expect(detectCompression(compressed)).toBe(alg)
    const chunks = Array.from({ length: Math.ceil(compressed.length / 10_000) }, (_, i) => compressed.subarray(i * 10_000, (i + 1) * 10_000))
    expect(digestOf(await through(chunks, decompressStream(alg)))).toBe(digestOf(data))
  })

  it.skipIf(!binary)('respects the backpressure of a slow reader', async () => {
    const data = sample(8 << 20)
    const compressed = tool(binary!, ['-c', '-1'], data)
    const t = decompressStream(alg)
    let n = 0
    const hash = digestOf(data)
    const chunks: Buffer[] = []
    await pipeline(Readable.from([compressed]), t, async (src: AsyncIterable<Buffer>) => {
      for await (const c of src) {
        // The transform never holds much more than its high-water mark while we dawdle.
        expect(t.readableLength).toBeLessThanOrEqual(4 << 20)
        chunks.push(c)
        n += c.length
        if (chunks.length % 8 === 0) await new Promise((r) => setTimeout(r, 1))
      }
    })
    expect(n).toBe(data.length)
    expect(digestOf(Buffer.concat(chunks))).toBe(hash)
  })

  it.skipIf(!binary)('decodes concatenated streams', async () => {
    const a = sample(50_000)
    const b = sample(70_000)
    const joined = Buffer.concat([tool(binary!, ['-c'], a), tool(binary!, ['-c'], b)])
    expect((await through(joined, decompressStream(alg))).equals(Buffer.concat([a, b]))).toBe(true)
  })

  it.skipIf(!binary)('fails corrupt input with COMPRESSION_INVALID naming the program', async () => {
    const compressed = Buffer.from(tool(binary!, ['-c'], sample(200_000)))
    compressed.fill(0x33, 40, 400)
    await expect(through(compressed, decompressStream(alg))).rejects.toMatchObject({
      code: 'COMPRESSION_INVALID',
      message: expect.stringContaining(alg),
    })
  })

  it.skipIf(!binary)('fails truncated input', async () => {
    const compressed = tool(binary!, ['-c'], sample(200_000))
    await expect(through(compressed.subarray(0, compressed.length >> 1), decompressStream(alg))).rejects.toMatchObject({
      code: 'COMPRESSION_INVALID',
    })
  })

  it.skipIf(!binary)('kills the program when the stream is destroyed', async () => {
    const t = decompressStream(alg) as Transform & { pid?: number }
    t.write(tool(binary!, ['-c'], sample(10_000)).subarray(0, 100))
    await waitFor(() => t.pid !== undefined)
    const pid = t.pid!
    expect(alive(pid)).toBe(true)
    t.destroy()
    await waitFor(() => !alive(pid))
  })

  it.skipIf(!binary)('kills the program when the pipeline is aborted', async () => {
    const ac = new AbortController()
    const t = decompressStream(alg) as Transform & { pid?: number }
    const src = new PassThrough()
    src.write(tool(binary!, ['-c'], sample(10_000)).subarray(0, 100))
    const p = pipeline(src, t, new PassThrough(), { signal: ac.signal })
    await waitFor(() => t.pid !== undefined)
    const pid = t.pid!
    ac.abort()
    await expect(p).rejects.toMatchObject({ name: 'AbortError' })
    await waitFor(() => !alive(pid))
  })

  it('throws UNSUPPORTED when the program is not on PATH', () => {
    const saved = process.env.PATH
    onTestFinished(() => {
      process.env.PATH = saved
    })
    process.env.PATH = '/nonexistent-blobcache-test'
    expect(() => decompressStream(alg)).toThrow(expect.objectContaining({ code: 'UNSUPPORTED' }))
  })
})

describe('compressStream/decompressStream argument checks', () => {
  it('rejects unknown algorithms with UNSUPPORTED', () => {
    expect(() => compressStream('xz' as never)).toThrow(expect.objectContaining({ code: 'UNSUPPORTED' }))
    expect(() => decompressStream('lz4' as never)).toThrow(expect.objectContaining({ code: 'UNSUPPORTED' }))
  })
})
