import { open, readdir, stat, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { gzipSync } from 'node:zlib'
import { describe, expect, it } from 'vitest'
import { readAll, testDir } from '../../test/helpers/conformance.js'
import { digestOf } from '../digest.js'
import { tempPath } from './files.js'
import { CacheTee } from './tee.js'

async function tee(dir: string, data: Buffer, extra: { failAfter?: number; decompress?: boolean } = {}) {
  const digest = digestOf(data)
  const path = tempPath(dir, digest)
  const handle = await open(path, 'wx')
  if (extra.failAfter !== undefined) {
    let writes = 0
    const real = handle.write.bind(handle)
    handle.write = (async (...args: Parameters<typeof real>) => {
      if (++writes > extra.failAfter!) throw Object.assign(new Error('no space left on device'), { code: 'ENOSPC' })
      return real(...args)
    }) as typeof handle.write
  }
  const errors: string[] = []
  const t = new CacheTee({
    dir, digest, name: digest, file: { handle, path }, decompress: extra.decompress ?? true,
    onError: (what) => errors.push(what),
  })
  return { t, digest, errors }
}

const chunks = (data: Buffer, n: number) => Array.from({ length: Math.ceil(data.length / n) }, (_, i) => data.subarray(i * n, (i + 1) * n))

describe('CacheTee', () => {
  it('passes every byte through and names the entry only after settle(true)', async () => {
    const dir = await testDir()
    const data = Buffer.from('x'.repeat(100_000))
    const { t, digest } = await tee(dir, data)
    const out = await readAll(Readable.from(chunks(data, 7000)).pipe(t))
    expect(out).toEqual(data)
    expect((await readdir(dir)).filter((n) => !n.startsWith('.tmp-'))).toEqual([])
    expect(await t.settle(true)).toMatchObject({ verified: true, stored: true, algorithm: null })
    expect(await readdir(dir)).toEqual([digest])
  })

  it('keeps passing data when the cache file fails, reports it once and leaves nothing', async () => {
    const dir = await testDir()
    const data = Buffer.from('y'.repeat(100_000))
    const { t, errors } = await tee(dir, data, { failAfter: 2 })
    expect(await readAll(Readable.from(chunks(data, 5000)).pipe(t))).toEqual(data)
    expect(await t.settle(true)).toMatchObject({ verified: true, stored: false })
    expect(errors).toHaveLength(1)
    expect(await readdir(dir)).toEqual([])
  })

  it('discards everything on settle(false) and when the stream was not read to its end', async () => {
    const dir = await testDir()
    const data = gzipSync(Buffer.from('z'.repeat(50_000)))
    const a = await tee(dir, data)
    await readAll(Readable.from([data]).pipe(a.t))
    expect(await a.t.settle(false)).toMatchObject({ verified: false, stored: false, algorithm: 'gzip' })
    const b = await tee(dir, data)
    Readable.from(chunks(data, 100)).pipe(b.t)
    b.t.read(1) // the consumer stops early
    expect(await b.t.settle(true)).toMatchObject({ verified: false, stored: false })
    expect(await readdir(dir)).toEqual([])
  })

  it('does not replace an entry another writer placed meanwhile', async () => {
    const dir = await testDir()
    const data = Buffer.from('same bytes')
    const { t, digest } = await tee(dir, data)
    await readAll(Readable.from([data]).pipe(t))
    await writeFile(join(dir, digest), data)
    const { ino } = await stat(join(dir, digest))
    expect(await t.settle(true)).toMatchObject({ stored: true })
    expect((await stat(join(dir, digest))).ino).toBe(ino)
    expect(await readdir(dir)).toEqual([digest])
  })
})
