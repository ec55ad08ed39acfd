// Hashes of streams: inline for small blobs, on the hashing thread for large ones (from the start
// with a known size, after THREAD_HASH_MIN bytes with an unknown one), in order, whatever memory
// the chunks are in.
import { randomBytes } from 'node:crypto'
import { describe, expect, it } from 'vitest'
import { digestOf } from '../digest.js'
import { ThreadHash, giveBackSlab, newSlab } from './hash-thread.js'
import { HASH_HIGH_WATER, StreamHash, THREAD_HASH_MIN } from './stream-hash.js'

/** `data` in pieces of `size` bytes, each made by `make` (plain buffers by default). */
function pieces(data: Buffer, size: number, make: (n: number) => Buffer = (n) => Buffer.alloc(n)): Buffer[] {
  const out: Buffer[] = []
  for (let i = 0; i < data.length; i += size) {
    const part = data.subarray(i, i + size)
    const b = make(part.length)
    part.copy(b)
    out.push(b)
  }
  return out
}

const shared = (n: number) => Buffer.from(new SharedArrayBuffer(n))

function toShared(b: Buffer): Buffer {
  const out = shared(b.length)
  b.copy(out)
  return out
}

/** Gives every piece to `hash`, waiting whenever it asks to; returns how often it asked. */
async function feed(hash: StreamHash, parts: Buffer[]): Promise<number> {
  let waits = 0
  for (const p of parts) {
    if (!hash.update(p)) {
      waits++
      await hash.ready()
    }
  }
  return waits
}

describe('StreamHash', () => {
  it.each([
    ['small, known size: inline', 300_000, 300_000, undefined, false],
    ['small, unknown size: inline', 300_000, -1, undefined, false],
    ['large, known size: on the thread, plain chunks copied', THREAD_HASH_MIN + 12_345, THREAD_HASH_MIN + 12_345, undefined, true],
    ['large, known size: on the thread, shared chunks where they are', THREAD_HASH_MIN + 77, THREAD_HASH_MIN + 77, shared, true],
    ['large, unknown size: moves to the thread', THREAD_HASH_MIN * 2 + 5, -1, undefined, true],
    ['large, unknown size, shared chunks: moves to the thread', THREAD_HASH_MIN * 2 + 5, -1, shared, true],
  ] as const)('%s', async (_what, length, size, make, threaded) => {
    const data = randomBytes(length)
    for (const algorithm of ['sha256', 'sha512'] as const) {
      const hash = new StreamHash(algorithm, size)
      await feed(hash, pieces(data, 65_536 + 3, make))
      expect(hash.threaded).toBe(threaded)
      expect(`${algorithm}:${await hash.digest()}`).toBe(digestOf(data, algorithm))
    }
  })

  it('mixes plain and shared chunks in order', async () => {
    const data = randomBytes(THREAD_HASH_MIN + (3 << 20))
    const parts = pieces(data, 700_001).map((p, i) => (i % 3 === 1 ? p : toShared(p)))
    const hash = new StreamHash('sha256', data.length)
    await feed(hash, parts)
    expect(`sha256:${await hash.digest()}`).toBe(digestOf(data))
  })

  it('copies pieces of the slab pool, which their owner may reuse at once', async () => {
    const data = randomBytes(THREAD_HASH_MIN + 1000)
    const hash = new StreamHash('sha256', data.length)
    for (let i = 0; i < data.length; i += 500_000) {
      const memory = newSlab()
      const piece = Buffer.from(memory, 0, Math.min(500_000, data.length - i))
      data.copy(piece, 0, i)
      const more = hash.update(piece)
      piece.fill(0) // the owner is done with it: the hash must not read it any more
      giveBackSlab(memory)
      if (!more) await hash.ready()
    }
    expect(`sha256:${await hash.digest()}`).toBe(digestOf(data))
  })

  it('asks its caller to wait while the thread is behind, and holds a bounded amount', async () => {
    const data = randomBytes(THREAD_HASH_MIN * 4)
    const hash = new StreamHash('sha256', data.length)
    let held = 0
    let asked = false
    for (const p of pieces(data, 1 << 20, shared)) {
      held += p.length
      if (!hash.update(p)) {
        asked = true
        expect(held).toBeLessThanOrEqual(HASH_HIGH_WATER + (1 << 20))
        await hash.ready()
        held = 0
      }
    }
    expect(asked).toBe(true)
    expect(`sha256:${await hash.digest()}`).toBe(digestOf(data))
  })

  it('refuses bytes after the digest, and a disposed hash wakes its waiters', async () => {
    const hash = new StreamHash('sha256', THREAD_HASH_MIN)
    for (const p of pieces(randomBytes(HASH_HIGH_WATER * 2), 1 << 20, shared)) hash.update(p)
    const waiting = hash.ready()
    hash.dispose()
    await expect(waiting).resolves.toBeUndefined()
    expect(() => hash.update(Buffer.alloc(1))).toThrow()
    const done = new StreamHash('sha256')
    done.update(Buffer.from('x'))
    expect(`sha256:${await done.digest()}`).toBe(digestOf('x'))
    expect(() => done.update(Buffer.from('y'))).toThrow()
  })
})

describe('ThreadHash.updateTransferred', () => {
  it('hashes plain memory handed to the thread and hands it back', async () => {
    const data = randomBytes(3 << 20)
    const hash = new ThreadHash('sha256')
    let buffer = new ArrayBuffer(1 << 20)
    for (let i = 0; i < data.length; i += 1 << 20) {
      const n = data.copy(Buffer.from(buffer), 0, i, i + (1 << 20))
      const sent = buffer
      const back = hash.updateTransferred(sent, 0, n)
      expect(sent.byteLength).toBe(0) // detached while the thread has it
      buffer = await back
      expect(buffer.byteLength).toBe(1 << 20)
    }
    expect(`sha256:${await hash.digest()}`).toBe(digestOf(data))
  })
})
