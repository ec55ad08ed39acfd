// Blob files of the image cache: written in order, hashed inline or on the hashing thread, in
// shared pieces whose memory is reused; failures and aborts leave nothing behind.
import { randomBytes } from 'node:crypto'
import { readFile, readdir } from 'node:fs/promises'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { setTimeout } from 'node:timers/promises'
import { describe, expect, it } from 'vitest'
import { digestOf } from '../digest.js'
import { abortingStream, tempLeftovers, testDir } from '../../test/helpers/conformance.js'
import { BlobFile, THREAD_HASH_MIN } from './blob-file.js'
import { blobPath, writeBlob } from '../image-cache/blobs.js'
import { ThreadHash, giveBackSlab, newSlab, sharedPiece } from './hash-thread.js'
import { runningThreads, setIdleLimit, stopIdleThreads } from './script-worker.js'

/** `data` cut into pieces of `size` bytes (the last one shorter), made by `make`. */
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

describe('ThreadHash', () => {
  it('hashes pieces of shared memory in order, several hashes at once', async () => {
    const a = randomBytes(3 << 20)
    const b = randomBytes(1 << 20)
    const ha = new ThreadHash('sha256')
    const hb = new ThreadHash('sha512')
    const waits: Promise<void>[] = []
    for (const [h, data] of [[ha, a], [hb, b]] as const) {
      for (const p of pieces(data, 700_000, (n) => Buffer.from(new SharedArrayBuffer(n)))) {
        waits.push(h.update(p.buffer as SharedArrayBuffer, p.byteOffset, p.length))
      }
    }
    await Promise.all(waits)
    expect(`sha256:${await ha.digest()}`).toBe(digestOf(a))
    expect(`sha512:${await hb.digest()}`).toBe(digestOf(b, 'sha512'))
    // an empty hash, and one that is forgotten
    expect(`sha256:${await new ThreadHash('sha256').digest()}`).toBe(digestOf(Buffer.alloc(0)))
    new ThreadHash('sha256').dispose()
  })

  it('stopIdleThreads leaves a thread that keeps an open hash, and ends it once the hash is digested', async () => {
    const data = randomBytes(2 << 20)
    const [first, second] = pieces(data, 1 << 20, (n) => Buffer.from(new SharedArrayBuffer(n)))
    const h = new ThreadHash('sha256')
    await h.update(first.buffer as SharedArrayBuffer, first.byteOffset, first.length)
    expect(runningThreads()).toBeGreaterThan(0)
    await stopIdleThreads()
    // the thread holds the hash's state: it was left running, and the hash goes on
    await h.update(second.buffer as SharedArrayBuffer, second.byteOffset, second.length)
    expect(`sha256:${await h.digest()}`).toBe(digestOf(data))
    await stopIdleThreads()
    expect(runningThreads()).toBe(0)
    // the next hash starts a new thread
    const again = new ThreadHash('sha256')
    await again.update(first.buffer as SharedArrayBuffer, first.byteOffset, first.length)
    expect(`sha256:${await again.digest()}`).toBe(digestOf(first))
    expect(runningThreads()).toBe(1)
    await stopIdleThreads()
  })

  it('the hashing thread ends by itself once idle for longer than the limit, not while a hash is open', async () => {
    const previous = setIdleLimit(50)
    try {
      const data = randomBytes(2 << 20)
      const [first, second] = pieces(data, 1 << 20, (n) => Buffer.from(new SharedArrayBuffer(n)))
      const h = new ThreadHash('sha256')
      await h.update(first.buffer as SharedArrayBuffer, first.byteOffset, first.length)
      await setTimeout(300)
      expect(runningThreads()).toBe(1)
      await h.update(second.buffer as SharedArrayBuffer, second.byteOffset, second.length)
      expect(`sha256:${await h.digest()}`).toBe(digestOf(data))
      for (let waited = 0; runningThreads() > 0 && waited < 5000; waited += 20) await setTimeout(20)
      expect(runningThreads()).toBe(0)
    } finally {
      setIdleLimit(previous)
    }
  })
})

describe('BlobFile', () => {
  for (const [what, size, make] of [
    ['small, hashed inline', 300_000, undefined],
    ['large, copied into slabs and hashed on the thread', THREAD_HASH_MIN + 123_457, undefined],
    ['large, in shared pieces hashed where they are', THREAD_HASH_MIN + 77, sharedPiece],
  ] as const) {
    it(`writes and hashes a blob: ${what}`, async () => {
      const dir = await testDir()
      const data = randomBytes(size)
      const file = await BlobFile.create(join(dir, 'f'), { algorithm: 'sha256', size, flush: true })
      try {
        let waits = 0
        for (const p of pieces(data, 65_536, make)) {
          if (!file.write(p, () => {})) waits++
        }
        const { bytes, hex } = await file.finish()
        expect(bytes).toBe(size)
        expect(`sha256:${hex}`).toBe(digestOf(data))
        await file.sync()
        // everything was handed over at once: past HIGH_WATER the caller is asked to wait
        if (size > THREAD_HASH_MIN) expect(waits).toBeGreaterThan(0)
        else expect(waits).toBe(0)
      } finally {
        await file.close()
      }
      expect((await readFile(join(dir, 'f'))).equals(data)).toBe(true)
    })
  }

  it('refuses an existing file', async () => {
    const dir = await testDir()
    const f = await BlobFile.create(join(dir, 'f'))
    await f.close()
    await expect(BlobFile.create(join(dir, 'f'))).rejects.toMatchObject({ code: 'EEXIST' })
  })

  it('reuses a slab only once the piece in it is written and hashed, and keeps none when no file is open', async () => {
    const dir = await testDir()
    const data = randomBytes(THREAD_HASH_MIN + (3 << 20))
    const other = await BlobFile.create(join(dir, 'other')) // an open file keeps the free slabs
    // the same blob twice (the second replaces the first) through the same pool of slabs
    const used = new Set<ArrayBufferLike>()
    for (let round = 0; round < 2; round++) {
      const parts = pieces(data, (1 << 20) + 1000, sharedPiece)
      for (const p of parts) used.add(p.buffer)
      const stored = await writeBlob(dir, Readable.from(parts), { expected: digestOf(data), size: data.length })
      expect(stored.digest).toBe(digestOf(data))
      expect((await readFile(blobPath(dir, stored.digest))).equals(data)).toBe(true)
    }
    const again = newSlab()
    expect(used.has(again)).toBe(true)
    giveBackSlab(again)
    await other.close()
    expect(used.has(newSlab())).toBe(false)
  })
})

describe('writeBlob of large blobs (hashing thread)', () => {
  it('fails DIGEST_INVALID on a wrong digest and names nothing', async () => {
    const dir = await testDir()
    const data = randomBytes(THREAD_HASH_MIN + 1)
    const stream = Readable.from(pieces(data, 65_536))
    await expect(writeBlob(dir, stream, { expected: digestOf('other'), size: data.length })).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
    expect(await readdir(join(dir, 'blobs', 'sha256'))).toEqual([])
  })

  it('rejects with the reason of an abort mid-way and leaves no temp file', async () => {
    const dir = await testDir()
    const data = randomBytes(THREAD_HASH_MIN * 2)
    const controller = new AbortController()
    const reason = new Error('stop')
    const stream = abortingStream(data, controller, reason)
    await expect(writeBlob(dir, stream, { expected: digestOf(data), size: data.length, signal: controller.signal })).rejects.toBe(reason)
    expect(await tempLeftovers(dir)).toEqual([])
    expect(await readdir(join(dir, 'blobs', 'sha256'))).toEqual([])
  })

  it('fails SIZE_INVALID on more bytes than announced', async () => {
    const dir = await testDir()
    const data = randomBytes(THREAD_HASH_MIN + 10)
    const stream = Readable.from(pieces(data, 65_536))
    await expect(writeBlob(dir, stream, { expected: digestOf(data), size: data.length - 1 })).rejects.toMatchObject({ code: 'SIZE_INVALID' })
    expect(await tempLeftovers(dir)).toEqual([])
  })
})
