import { createHash, randomBytes } from 'node:crypto'
import { PassThrough, Readable, Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { describe, expect, it } from 'vitest'
import {
  type Digest,
  DigestStream,
  checkDigest,
  digestAlgorithm,
  digestingStream,
  digestFrom,
  digestHex,
  digestOf,
  isDigest,
  parseDigest,
  streamDigest,
  verifyDigest,
} from './digest.js'
import { DigestMismatchError } from './errors.js'

const hex256 = createHash('sha256').update('hello').digest('hex')
const hex512 = createHash('sha512').update('hello').digest('hex')

describe('parseDigest and isDigest', () => {
  it.each([`sha256:${hex256}`, `sha512:${hex512}`, `sha256:${'0'.repeat(64)}`])('accepts %s', (s) => {
    expect(isDigest(s)).toBe(true)
    expect(parseDigest(s)).toBe(s)
  })

  it.each([
    ['a path', 'sha256:../../x'],
    ['a path after valid hex', `sha256:${hex256}/../x`],
    ['uppercase hex', `sha256:${hex256.toUpperCase()}`],
    ['an uppercase algorithm', `SHA256:${hex256}`],
    ['short hex', `sha256:${hex256.slice(1)}`],
    ['long hex', `sha256:${hex256}0`],
    ['sha512 length under sha256', `sha256:${hex512}`],
    ['sha256 length under sha512', `sha512:${hex256}`],
    ['sha384', `sha384:${'a'.repeat(96)}`],
    ['md5', `md5:${'a'.repeat(32)}`],
    ['no algorithm', hex256],
    ['an empty string', ''],
    ['a trailing newline', `sha256:${hex256}\n`],
    ['a leading space', ` sha256:${hex256}`],
    ['non-hex', `sha256:${'g'.repeat(64)}`],
    ['two colons', `sha256::${hex256}`],
  ])('rejects %s', (_what, s) => {
    expect(isDigest(s)).toBe(false)
    expect(() => parseDigest(s)).toThrow(expect.objectContaining({ code: 'DIGEST_INVALID' }))
  })

  it.each([undefined, null, 42, {}, [`sha256:${hex256}`]])('rejects non-string %j', (v) => {
    expect(isDigest(v)).toBe(false)
    expect(() => parseDigest(v)).toThrow(expect.objectContaining({ code: 'DIGEST_INVALID' }))
  })

  it('keeps error messages short for huge input', () => {
    try {
      parseDigest('x'.repeat(100_000))
      expect.unreachable()
    } catch (err) {
      expect((err as Error).message.length).toBeLessThan(300)
    }
  })
})

describe('digest helpers', () => {
  it('splits algorithm and hex', () => {
    const d = parseDigest(`sha512:${hex512}`)
    expect(digestAlgorithm(d)).toBe('sha512')
    expect(digestHex(d)).toBe(hex512)
  })

  it('digestFrom validates', () => {
    expect(digestFrom('sha256', hex256)).toBe(`sha256:${hex256}`)
    expect(() => digestFrom('sha256', '../x')).toThrow(expect.objectContaining({ code: 'DIGEST_INVALID' }))
  })

  it('digestOf hashes buffers and strings with either algorithm', () => {
    expect(digestOf('hello')).toBe(`sha256:${hex256}`)
    expect(digestOf(Buffer.from('hello'))).toBe(`sha256:${hex256}`)
    expect(digestOf(new Uint8Array(Buffer.from('hello')), 'sha512')).toBe(`sha512:${hex512}`)
    expect(isDigest(digestOf(''))).toBe(true)
  })
})

/** Streams `chunks` through `verifier` into nowhere. */
function run(chunks: Buffer[], verifier: DigestStream): Promise<void> {
  return pipeline(Readable.from(chunks), verifier, new Writable({ write: (_c, _e, cb) => cb() }))
}

describe('verifyDigest', () => {
  const data = Buffer.from('hello')
  const pieces = [Buffer.from('he'), Buffer.from(''), Buffer.from('llo')]

  it('passes matching bytes through and reports digest and size', async () => {
    const v = verifyDigest({ expected: parseDigest(`sha256:${hex256}`), size: 5 })
    const out: Buffer[] = []
    await pipeline(Readable.from(pieces), v, new Writable({ write: (c, _e, cb) => (out.push(c), cb()) }))
    expect(Buffer.concat(out).equals(data)).toBe(true)
    expect(v.digest).toBe(`sha256:${hex256}`)
    expect(v.bytes).toBe(5)
  })

  it('verifies sha512 digests', async () => {
    const v = verifyDigest({ expected: parseDigest(`sha512:${hex512}`) })
    await run(pieces, v)
    expect(v.digest).toBe(`sha512:${hex512}`)
  })

  it('only computes without an expected digest, in the algorithm asked for', async () => {
    const v = verifyDigest()
    await run(pieces, v)
    expect(v.digest).toBe(`sha256:${hex256}`)
    const w = verifyDigest({ algorithm: 'sha512', size: -1 })
    await run(pieces, w)
    expect(w.digest).toBe(`sha512:${hex512}`)
  })

  it('fails at the end with DIGEST_INVALID on a mismatch', async () => {
    const expected = digestOf('other')
    const v = verifyDigest({ expected })
    const seen: Buffer[] = []
    const p = pipeline(Readable.from(pieces), v, new Writable({ write: (c, _e, cb) => (seen.push(c), cb()) }))
    await expect(p).rejects.toBeInstanceOf(DigestMismatchError)
    await expect(p).rejects.toMatchObject({ code: 'DIGEST_INVALID', expected, actual: `sha256:${hex256}` })
    // Failure comes at the end: all bytes were passed on before it.
    expect(Buffer.concat(seen).equals(data)).toBe(true)
  })

  it('fails with SIZE_INVALID as soon as too many bytes arrive', async () => {
    const v = verifyDigest({ expected: parseDigest(`sha256:${hex256}`), size: 3 })
    const seen: Buffer[] = []
    const p = pipeline(Readable.from(pieces), v, new Writable({ write: (c, _e, cb) => (seen.push(c), cb()) }))
    await expect(p).rejects.toMatchObject({ code: 'SIZE_INVALID' })
    expect(Buffer.concat(seen).length).toBeLessThanOrEqual(3)
  })

  it('fails with SIZE_INVALID at the end when too few bytes arrive', async () => {
    const v = verifyDigest({ expected: parseDigest(`sha256:${hex256}`), size: 6 })
    await expect(run(pieces, v)).rejects.toMatchObject({ code: 'SIZE_INVALID', message: expect.stringContaining('got 5 bytes') })
  })

  it('checks the size even without a digest', async () => {
    await expect(run(pieces, verifyDigest({ size: 4 }))).rejects.toMatchObject({ code: 'SIZE_INVALID' })
    await expect(run(pieces, verifyDigest({ size: 5 }))).resolves.toBeUndefined()
  })

  it('accepts an empty blob of size 0', async () => {
    const v = verifyDigest({ expected: digestOf(''), size: 0 })
    await run([], v)
    expect(v.digest).toBe(digestOf(''))
    expect(v.bytes).toBe(0)
  })

  it('throws if the digest is read before the end', () => {
    const v = new DigestStream()
    expect(() => v.digest).toThrow()
  })

  it('verifies a large stream in chunks', async () => {
    const big = Buffer.alloc(5 << 20, 7)
    const chunks = Array.from({ length: 5 }, (_, i) => big.subarray(i << 20, (i + 1) << 20))
    const v = verifyDigest({ expected: digestOf(big) as Digest, size: big.length })
    await run(chunks, v)
    expect(v.bytes).toBe(big.length)
  })

  it('propagates an upstream error unchanged', async () => {
    const src = new PassThrough()
    const boom = new Error('boom')
    const p = run([], verifyDigest())
    const q = pipeline(src, verifyDigest(), new Writable({ write: (_c, _e, cb) => cb() }))
    setTimeout(() => src.destroy(boom), 5)
    await p
    await expect(q).rejects.toBe(boom)
  })
})

describe('digestingStream and checkDigest', () => {
  it('a consumer takes the digest from a DigestStream instead of hashing again', async () => {
    const data = Buffer.from('hello blobcache')
    const expected = digestOf(data)
    const v = verifyDigest({ expected, size: data.length })
    const seen = digestingStream(v, expected)
    expect(seen).toBe(v)
    await pipeline(Readable.from([data]), v, new Writable({ write: (_c, _e, cb) => cb() }))
    expect(seen![streamDigest]()).toEqual({ digest: expected, bytes: data.length })
  })

  it('is not used for another algorithm or a plain stream', () => {
    const sha512 = digestOf('x', 'sha512')
    expect(digestingStream(verifyDigest(), sha512)).toBeUndefined()
    expect(digestingStream(new PassThrough())).toBeUndefined()
  })

  it('checkDigest fails like the stream would', () => {
    const d = digestOf('abc')
    expect(() => checkDigest({ digest: d, bytes: 3 }, { expected: d, size: 3 })).not.toThrow()
    expect(() => checkDigest({ digest: d, bytes: 3 }, { expected: digestOf('abd') })).toThrow(expect.objectContaining({ code: 'DIGEST_INVALID' }))
    expect(() => checkDigest({ digest: d, bytes: 3 }, { size: 4 })).toThrow(expect.objectContaining({ code: 'SIZE_INVALID' }))
  })
})

describe('verifyDigest of a large blob', () => {
  const big = randomBytes((4 << 20) + 300_007)
  const chunks = () => Array.from({ length: Math.ceil(big.length / 65_536) }, (_, i) => big.subarray(i * 65_536, (i + 1) * 65_536))

  it.each([
    ['a known size', big.length],
    ['an unknown size', -1],
  ])('passes the bytes on and gives the digest once ended, with %s', async (_what, size) => {
    const v = verifyDigest({ expected: digestOf(big), size })
    const out: Buffer[] = []
    await pipeline(Readable.from(chunks()), v, new Writable({ write: (c, _e, cb) => (out.push(c), cb()) }))
    expect(Buffer.concat(out).equals(big)).toBe(true)
    expect(v[streamDigest]()).toEqual({ digest: digestOf(big), bytes: big.length })
  })

  it('fails DIGEST_INVALID before it ends when the bytes do not match', async () => {
    const wrong = Buffer.from(big)
    wrong[wrong.length >> 1] ^= 1
    const v = verifyDigest({ expected: digestOf(big), size: big.length })
    let ended = false
    v.on('end', () => (ended = true))
    const p = pipeline(Readable.from([wrong]), v, new Writable({ write: (_c, _e, cb) => cb() }))
    await expect(p).rejects.toMatchObject({ code: 'DIGEST_INVALID', expected: digestOf(big), actual: digestOf(wrong) })
    expect(ended).toBe(false)
  })

  it('fails SIZE_INVALID as soon as too many bytes arrive', async () => {
    const v = verifyDigest({ expected: digestOf(big), size: big.length - 1 })
    await expect(run(chunks(), v)).rejects.toMatchObject({ code: 'SIZE_INVALID' })
  })
})
