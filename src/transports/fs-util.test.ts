// Blob writes of the local transports: verified before they are named, hashed once (by an
// upstream verifier, or here: on the hashing thread for large blobs), flushed to disk as they
// grow when durable, and nothing left behind on any failure.
import { randomBytes } from 'node:crypto'
import * as fs from 'node:fs'
import { readFile, readdir, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { afterEach, describe, expect, it, vi } from 'vitest'
import { type Digest, digestHex, digestOf, verifyDigest } from '../digest.js'
import { FLUSH_BYTES } from '../io/blob-file.js'
import { THREAD_HASH_MIN } from '../io/blob-file.js'
import { abortingStream, tempLeftovers, testDir } from '../../test/helpers/conformance.js'
import { copyBlob, writeBlob } from './fs-util.js'

vi.mock('node:fs', async (original) => {
  const fs = await original<typeof import('node:fs')>()
  return { ...fs, fsync: vi.fn(fs.fsync), fdatasync: vi.fn(fs.fdatasync) }
})

afterEach(() => {
  vi.mocked(fs.fsync).mockClear()
  vi.mocked(fs.fdatasync).mockClear()
})

/** `data` in 64 KiB chunks. */
const chunks = (data: Buffer) => Readable.from(Array.from({ length: Math.ceil(data.length / 65_536) }, (_, i) => data.subarray(i * 65_536, (i + 1) * 65_536)))
const target = (dir: string) => (d: Digest) => join(dir, digestHex(d))

describe('writeBlob', () => {
  it.each([
    ['a small blob', 100_000],
    ['a large blob (hashed on the hashing thread)', THREAD_HASH_MIN + 4321],
  ])('hashes %s itself, verifies it and names it', async (_what, length) => {
    const dir = await testDir()
    const data = randomBytes(length)
    for (const opts of [{ expected: digestOf(data), size: length }, {}]) {
      const stored = await writeBlob(chunks(data), dir, target(dir), opts)
      expect(stored).toMatchObject({ digest: digestOf(data), size: length, path: join(dir, digestHex(digestOf(data))) })
      expect((await readFile(stored.path)).equals(data)).toBe(true)
    }
    expect(await tempLeftovers(dir)).toEqual([])
  })

  it('takes the digest from an upstream verifier, which fails before anything is named', async () => {
    const dir = await testDir()
    const data = randomBytes(THREAD_HASH_MIN + 99)
    const expected = digestOf(data)
    const stored = await writeBlob(chunks(data).pipe(verifyDigest({ expected, size: data.length })), dir, target(dir), { expected, size: data.length })
    expect(stored).toMatchObject({ digest: expected, size: data.length, created: true })

    const wrong = Buffer.from(data)
    wrong[12345] ^= 0xff
    const other = await testDir()
    const verifier = chunks(wrong).pipe(verifyDigest({ expected, size: data.length }))
    await expect(writeBlob(verifier, other, target(other), { expected, size: data.length })).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
    expect(await readdir(other)).toEqual([])
  })

  it('fails with the error of a verifier that failed before the blob was handed over', async () => {
    // a small blob is read whole into the verifier's buffer, which fails at its end before the
    // destination has looked at it (copyImage hands it over after opening the file)
    const dir = await testDir()
    const data = randomBytes(5000)
    const verifier = verifyDigest({ expected: digestOf('other'), size: data.length })
    verifier.on('error', () => {})
    verifier.end(data)
    await new Promise((resolve) => verifier.once('close', resolve))
    await expect(writeBlob(verifier, dir, target(dir), { expected: digestOf('other') })).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
    expect(await readdir(dir)).toEqual([])
  })

  it('fails DIGEST_INVALID and SIZE_INVALID, leaving nothing', async () => {
    const dir = await testDir()
    const data = randomBytes(THREAD_HASH_MIN + 10)
    await expect(writeBlob(chunks(data), dir, target(dir), { expected: digestOf('other') })).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
    await expect(writeBlob(chunks(data), dir, target(dir), { size: data.length - 1 })).rejects.toMatchObject({ code: 'SIZE_INVALID' })
    await expect(writeBlob(chunks(data), dir, target(dir), { size: data.length + 1 })).rejects.toMatchObject({ code: 'SIZE_INVALID' })
    expect(await readdir(dir)).toEqual([])
  })

  it('rejects with the reason of an abort mid-way and leaves no temp file', async () => {
    const dir = await testDir()
    const data = randomBytes(THREAD_HASH_MIN * 2)
    const controller = new AbortController()
    const reason = new Error('stop')
    const stream = abortingStream(data, controller, reason)
    await expect(writeBlob(stream, dir, target(dir), { expected: digestOf(data), signal: controller.signal })).rejects.toBe(reason)
    expect(stream.destroyed).toBe(true)
    expect(await readdir(dir)).toEqual([])
  })

  it('fails BLOB_UNKNOWN when the stream closes before its end without an error, leaving nothing', async () => {
    const dir = await testDir()
    const data = randomBytes(THREAD_HASH_MIN * 2)
    let sent = 0
    const stream = new Readable({
      read() {
        if (sent === 20) return void this.destroy() // no error: a premature close
        this.push(data.subarray(sent * 65_536, ++sent * 65_536))
      },
    })
    await expect(writeBlob(stream, dir, target(dir), { expected: digestOf(data), size: data.length })).rejects.toMatchObject({ code: 'BLOB_UNKNOWN' })
    expect(await readdir(dir)).toEqual([])
  })

  it('keeps a file of the same size already there, and removes its own copy', async () => {
    const dir = await testDir()
    const data = randomBytes(1000)
    await writeFile(join(dir, digestHex(digestOf(data))), data)
    const stored = await writeBlob(chunks(data), dir, target(dir), { expected: digestOf(data), size: 1000 })
    expect(stored.created).toBe(false)
    expect(await readdir(dir)).toEqual([digestHex(digestOf(data))])
  })

  it('flushes a durable blob as it grows and fsyncs it before naming it; a staging blob neither', async () => {
    const dir = await testDir()
    const data = randomBytes(FLUSH_BYTES * 3)
    await writeBlob(chunks(data), dir, target(dir), { expected: digestOf(data) })
    expect(vi.mocked(fs.fdatasync).mock.calls.length).toBeGreaterThan(0)
    expect(vi.mocked(fs.fsync)).toHaveBeenCalledTimes(1)
    vi.mocked(fs.fsync).mockClear()
    vi.mocked(fs.fdatasync).mockClear()
    const other = await testDir()
    await writeBlob(chunks(data), other, target(other), { expected: digestOf(data), durable: false })
    expect(vi.mocked(fs.fdatasync)).not.toHaveBeenCalled()
    expect(vi.mocked(fs.fsync)).not.toHaveBeenCalled()
  })

  it('fails with the write error of the file', async () => {
    const dir = await testDir()
    const data = randomBytes(3 << 20)
    vi.mocked(fs.fdatasync).mockImplementationOnce(((_fd: number, cb: (err: NodeJS.ErrnoException | null) => void) =>
      cb(Object.assign(new Error('EIO: i/o error'), { code: 'EIO' }))) as typeof fs.fdatasync)
    const big = randomBytes(FLUSH_BYTES * 2)
    await expect(writeBlob(chunks(big), dir, target(dir), {})).rejects.toMatchObject({ code: 'EIO' })
    expect(await readdir(dir)).toEqual([])
    await writeBlob(chunks(data), dir, target(dir), {})
  })
})

describe('copyBlob', () => {
  it('hashes a file without a digest, and links one with a digest', async () => {
    const dir = await testDir()
    const data = randomBytes(THREAD_HASH_MIN + 1)
    const from = join(dir, 'from')
    await writeFile(from, data, { mode: 0o644 })
    const out = join(dir, 'out')
    await fs.promises.mkdir(out)
    const hashed = await copyBlob(from, out, target(out))
    expect(hashed).toMatchObject({ digest: digestOf(data), size: data.length, created: true })
    await expect(copyBlob(from, dir, target(dir), { expected: digestOf(data), size: data.length + 1 })).rejects.toMatchObject({ code: 'SIZE_INVALID' })
    const linked = await copyBlob(from, dir, target(dir), { expected: digestOf(data), size: data.length })
    expect((await readFile(linked.path)).equals(data)).toBe(true)
    expect(await tempLeftovers(dir)).toEqual([])
  })
})
