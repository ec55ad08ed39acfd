import { spawnSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { Readable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { crc32, gunzipSync, gzipSync } from 'node:zlib'
import { describe, expect, it } from 'vitest'
import { BLOCK_BYTES, ParallelGzip, looksIncompressible } from './parallel-gzip.js'

/** Text-like bytes: words of a small random vocabulary, which deflate shrinks to about a third. */
function words(bytes: number): Buffer {
  const vocabulary = Array.from({ length: 400 }, () => randomBytes(2 + (randomBytes(1)[0] % 6)).toString('hex'))
  const parts: string[] = []
  for (let n = 0; n < bytes; ) {
    const w = `${vocabulary[Math.floor(Math.random() * vocabulary.length)]} `
    parts.push(w)
    n += w.length
  }
  return Buffer.from(parts.join('')).subarray(0, bytes)
}

/** Gzips `input` given in `chunkBytes` pieces (all at once by default) and returns the output. */
async function gzip(input: Buffer, level = 4, chunkBytes = input.length || 1): Promise<Buffer> {
  const pieces: Buffer[] = []
  for (let i = 0; i < input.length; i += chunkBytes) pieces.push(input.subarray(i, i + chunkBytes))
  const out: Buffer[] = []
  await pipeline(Readable.from(pieces), new ParallelGzip(level), async (source: AsyncIterable<Buffer>) => {
    for await (const chunk of source) out.push(chunk)
  })
  return Buffer.concat(out)
}

// random, then text, then random again, ending inside a block: stored blocks, deflated blocks,
// the switches between them, and a short last block
const MIXED = Buffer.concat([randomBytes(2 * BLOCK_BYTES + 12345), words(3 * BLOCK_BYTES), randomBytes(70_000)])

describe('ParallelGzip', () => {
  it('writes one gzip member that gunzips to the input, with its CRC-32 and size', async () => {
    const out = await gzip(MIXED)
    expect(gunzipSync(out).equals(MIXED)).toBe(true)
    // header: no name, mtime 0, OS unknown; trailer: CRC-32 and size of the input
    expect([...out.subarray(0, 10)]).toEqual([0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 255])
    expect(out.readUInt32LE(out.length - 8)).toBe(crc32(MIXED) >>> 0)
    expect(out.readUInt32LE(out.length - 4)).toBe(MIXED.length)
  })

  it('is read by the system gzip, which checks the CRC-32 and size', async () => {
    const out = await gzip(MIXED)
    const test = spawnSync('gzip', ['-t'], { input: out })
    expect(test.status, String(test.stderr)).toBe(0)
    const back = spawnSync('gzip', ['-dc'], { input: out, maxBuffer: 64 << 20 })
    expect(back.status).toBe(0)
    expect(back.stdout.equals(MIXED)).toBe(true)
  })

  it('makes the same bytes however the input is cut', async () => {
    const input = MIXED.subarray(0, BLOCK_BYTES * 2 + 999)
    const whole = await gzip(input)
    expect((await gzip(input, 4, 7 * 1024)).equals(whole)).toBe(true)
    expect((await gzip(input, 4, BLOCK_BYTES + 1)).equals(whole)).toBe(true)
    expect((await gzip(input.subarray(0, 100_000), 4, 1)).equals(await gzip(input.subarray(0, 100_000)))).toBe(true)
  })

  it('loses next to nothing against one zlib stream: each block has the 32 KiB before it as its dictionary', async () => {
    const text = words(4 * BLOCK_BYTES)
    for (const level of [1, 4, 6]) {
      const ours = await gzip(text, level)
      const one = gzipSync(text, { level })
      expect(gunzipSync(ours).equals(text)).toBe(true)
      expect(ours.length).toBeLessThan(text.length / 2)
      // 4 blocks: a sync flush marker (5 bytes) and a few bits of a block boundary each
      expect(Math.abs(ours.length - one.length)).toBeLessThan(one.length * 0.002)
    }
  })

  it('stores random blocks as they are, and still deflates text that follows them', async () => {
    const random = randomBytes(3 * BLOCK_BYTES)
    const out = await gzip(random, 9)
    // stored outright (zlib's level 0) adds about 155 bytes a MiB; deflated at level 9, where zlib
    // ends up storing them too, the same bytes cost about 325 a MiB
    expect(out.length - random.length).toBeLessThan(3 * 250)
    expect(gunzipSync(out).equals(random)).toBe(true)
    const mixed = await gzip(MIXED, 6)
    expect(mixed.length).toBeLessThan(2 * BLOCK_BYTES + 12345 + 70_000 + 3 * BLOCK_BYTES * 0.5)
  })

  it('gzips nothing into an empty member', async () => {
    const out = await gzip(Buffer.alloc(0))
    expect(gunzipSync(out).length).toBe(0)
    expect(spawnSync('gzip', ['-t'], { input: out }).status).toBe(0)
  })

  it('refuses a level outside 1-9', () => {
    for (const level of [0, 10, -1, 2.5]) expect(() => new ParallelGzip(level)).toThrow(RangeError)
  })

  it('stops quietly when destroyed with blocks in flight', async () => {
    const gz = new ParallelGzip(9)
    const errors: unknown[] = []
    gz.on('error', (err) => errors.push(err))
    gz.write(words(BLOCK_BYTES))
    gz.write(words(BLOCK_BYTES))
    gz.destroy()
    await new Promise((resolve) => gz.once('close', resolve))
    // the pool's tasks end after this; none of them may surface as an unhandled rejection
    await new Promise((resolve) => setTimeout(resolve, 200))
    expect(errors).toEqual([])
  })
})

describe('looksIncompressible', () => {
  it('tells random bytes from text and machine-code-like bytes', () => {
    expect(looksIncompressible(randomBytes(BLOCK_BYTES))).toBe(true)
    expect(looksIncompressible(gzipSync(words(4 * BLOCK_BYTES)).subarray(0, BLOCK_BYTES))).toBe(true)
    expect(looksIncompressible(words(BLOCK_BYTES))).toBe(false)
    // bytes of a skewed distribution, as code has: far under 7.95 bits each
    const skewed = Buffer.from(randomBytes(BLOCK_BYTES).map((b) => (b < 128 ? b & 0x0f : b)))
    expect(looksIncompressible(skewed)).toBe(false)
  })

  it('deflates a block with text in its middle', () => {
    const block = Buffer.concat([randomBytes(BLOCK_BYTES / 2), words(BLOCK_BYTES / 2)])
    expect(looksIncompressible(block)).toBe(false)
  })

  it('always deflates a block under 64 KiB', () => {
    expect(looksIncompressible(randomBytes(60_000))).toBe(false)
  })
})
