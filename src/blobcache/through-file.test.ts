import { randomBytes } from 'node:crypto'
import { type FileHandle, open, readdir, readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { gzipSync } from 'node:zlib'
import { describe, expect, it } from 'vitest'
import { readAll, testDir } from '../../test/helpers/conformance.js'
import { type Digest, digestOf } from '../digest.js'
import { DirectWriter, STAGE_BYTES } from '../io/direct-write.js'
import type { BlobInfo } from '../types.js'
import { tempPath } from './files.js'
import { CacheWriter } from './tee.js'
import { putThroughFile } from './through-file.js'

/** Makes the writes of `handle` fail (ENOSPC) after `failAfter` of them. */
function failWrites(handle: FileHandle, failAfter?: number): FileHandle {
  if (failAfter === undefined) return handle
  let writes = 0
  const real = handle.write.bind(handle)
  handle.write = (async (...args: Parameters<typeof real>) => {
    if (++writes > failAfter) throw Object.assign(new Error('no space left on device'), { code: 'ENOSPC' })
    return real(...args)
  }) as typeof handle.write
  return handle
}

/**
 * A writer on a new temporary file; its writes fail after `failAfter` of them. With `direct`,
 * it writes through a DirectWriter whose second descriptor fails after `direct.failAfter`.
 */
async function writer(dir: string, data: Buffer, failAfter?: number, direct?: { failAfter?: number }) {
  const digest = digestOf(data)
  const path = tempPath(dir, digest)
  const handle = failWrites(await open(path, 'wx+'), failAfter)
  const directWriter = direct
    ? await DirectWriter.open(handle, { reopen: async () => failWrites(await open(path, 'r+'), direct.failAfter) })
    : undefined
  if (direct) expect(directWriter).toBeDefined()
  const errors: string[] = []
  const file = { handle, path, direct: directWriter }
  const w = new CacheWriter({ dir, digest, name: digest, file, decompress: true, onError: (what) => errors.push(what) })
  return { w, digest, errors }
}

/** A destination recording what it was given. */
function recorder() {
  const got: { fromFile?: Buffer; streamed?: Buffer } = {}
  return {
    got,
    async fromStream(stream: Readable): Promise<BlobInfo> {
      got.streamed = await readAll(stream)
      return { size: got.streamed.length }
    },
    async fromFile(path: string): Promise<BlobInfo> {
      got.fromFile = await readFile(path)
      return { size: got.fromFile.length }
    },
  }
}

const chunks = (data: Buffer, n: number) => Array.from({ length: Math.ceil(data.length / n) }, (_, i) => data.subarray(i * n, (i + 1) * n))

describe('putThroughFile', () => {
  it('writes the stream to the cache file only and gives the destination that file', async () => {
    const dir = await testDir()
    const data = gzipSync(randomBytes(300_000))
    const { w, digest } = await writer(dir, data)
    const dest = recorder()
    await putThroughFile(Readable.from(chunks(data, 64 << 10)), w, { digest, size: data.length }, {}, dest)
    expect(digestOf(dest.got.fromFile!)).toBe(digest)
    expect(dest.got.streamed).toBeUndefined()
    expect(await w.settle(true)).toMatchObject({ verified: true, stored: true, algorithm: 'gzip' })
    expect(digestOf(await readFile(join(dir, digest)))).toBe(digest)
  })

  it('gives the destination the stream (file bytes, then the rest) when the cache file fails midway', async () => {
    const dir = await testDir()
    const data = randomBytes(500_000)
    const { w, digest, errors } = await writer(dir, data, 3)
    const dest = recorder()
    await putThroughFile(Readable.from(chunks(data, 50_000)), w, { digest, size: data.length }, {}, dest)
    expect(dest.got.fromFile).toBeUndefined()
    expect(digestOf(dest.got.streamed!)).toBe(digest)
    expect(errors).toHaveLength(1)
    expect(await w.settle(true)).toMatchObject({ verified: true, stored: false })
    expect(await readdir(dir)).toEqual([])
  })

  it.each([
    ['a direct write fails, the plain ones do not', STAGE_BYTES * 3 + 777, 300_001, undefined, 1, 'file'],
    ['both fail midway', STAGE_BYTES * 3 + 777, 300_001, 0, 1, 'stream'],
    ['both fail midway through one chunk of several stages', STAGE_BYTES * 3 + 777, STAGE_BYTES * 4, 0, 1, 'stream'],
    ['both fail on the last, padded write', STAGE_BYTES * 2 + 777, 300_001, 0, 2, 'stream'],
  ] as const)('with direct writes, the destination gets every byte when %s', async (_name, size, chunkBytes, failAfter, directFailAfter, how) => {
    const dir = await testDir()
    const data = randomBytes(size)
    const { w, digest, errors } = await writer(dir, data, failAfter, { failAfter: directFailAfter })
    const dest = recorder()
    await putThroughFile(Readable.from(chunks(data, chunkBytes)), w, { digest, size: data.length }, {}, dest)
    const got = how === 'file' ? dest.got.fromFile : dest.got.streamed
    expect(got?.equals(data)).toBe(true)
    expect(errors).toHaveLength(how === 'file' ? 0 : 1)
    expect(await w.settle(true)).toMatchObject({ verified: true, stored: how === 'file' })
    if (how === 'file') expect((await readFile(join(dir, digest))).equals(data)).toBe(true)
    else expect(await readdir(dir)).toEqual([])
  })

  it.each([
    ['DIGEST_INVALID', (d: Buffer) => ({ digest: digestOf(Buffer.from('other')), size: d.length })],
    ['SIZE_INVALID', (d: Buffer) => ({ digest: digestOf(d), size: d.length + 1 })],
  ])('fails %s before the destination sees anything', async (code, info) => {
    const dir = await testDir()
    const data = randomBytes(10_000)
    const { w } = await writer(dir, data)
    const dest = recorder()
    const i = info(data) as BlobInfo & { digest: Digest }
    await expect(putThroughFile(Readable.from([data]), w, i, {}, dest)).rejects.toMatchObject({ code })
    expect(dest.got).toEqual({})
    await w.settle(false)
    expect(await readdir(dir)).toEqual([])
  })

  it('fails SIZE_INVALID as soon as more bytes arrive than announced, reading no further', async () => {
    const dir = await testDir()
    const data = randomBytes(10_000)
    const { w, digest } = await writer(dir, data)
    let pulled = 0
    async function* endless() {
      for (;;) {
        pulled++
        yield data
      }
    }
    await expect(putThroughFile(Readable.from(endless()), w, { digest, size: 25_000 }, {}, recorder())).rejects.toMatchObject({ code: 'SIZE_INVALID' })
    expect(pulled).toBeLessThan(6)
    await w.settle(false)
    expect(await readdir(dir)).toEqual([])
  })

  it('rejects with the source error, or with the abort reason', async () => {
    const dir = await testDir()
    const data = randomBytes(10_000)
    const a = await writer(dir, data)
    async function* broken() {
      yield data.subarray(0, 100)
      throw new Error('network reset')
    }
    await expect(putThroughFile(Readable.from(broken()), a.w, { digest: a.digest, size: -1 }, {}, recorder())).rejects.toThrow('network reset')
    await a.w.settle(false)
    const b = await writer(dir, data)
    const ac = new AbortController()
    const reason = new Error('stop')
    async function* slow() {
      yield data.subarray(0, 100)
      ac.abort(reason)
      await new Promise((r) => setTimeout(r, 20))
      yield data.subarray(100)
    }
    const p = putThroughFile(Readable.from(slow()), b.w, { digest: b.digest, size: -1 }, { signal: ac.signal }, recorder())
    await expect(p).rejects.toBe(reason)
    await b.w.settle(false)
    expect(await readdir(dir)).toEqual([])
  })
})
