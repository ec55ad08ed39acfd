import { Readable } from 'node:stream'
import { describe, expect, it } from 'vitest'
import { makeLayer } from '../../test/helpers/make-layer.js'
import { writeTar } from '../tar.js'
import { readAll } from '../../test/helpers/conformance.js'
import { PassThrough } from 'node:stream'
import { normalizeTarPath, readTarStream } from './tar-stream.js'

async function entries(tar: Buffer | Buffer[], read = true) {
  const out: { path: string; type: string; data: string; size: number }[] = []
  await readTarStream(Readable.from(Array.isArray(tar) ? tar : [tar]), async (e, data) => {
    let text = ''
    if (read) for await (const c of data) text += c.toString()
    out.push({ path: e.path, type: e.type, data: text, size: e.size })
  })
  return out
}

describe('readTarStream', () => {
  it('reads files and directories, byte by byte as well as whole', async () => {
    const tar = makeLayer([{ name: 'dir', type: 'dir' }, { name: 'dir/a', content: 'A'.repeat(700) }, { name: './b', content: '' }])
    const expected = [
      { path: 'dir', type: 'dir', data: '', size: 0 },
      { path: 'dir/a', type: 'file', data: 'A'.repeat(700), size: 700 },
      { path: 'b', type: 'file', data: '', size: 0 },
    ]
    expect(await entries(tar)).toEqual(expected)
    expect(await entries([...tar].map((b) => Buffer.from([b])))).toEqual(expected)
  })

  it('skips what the callback does not read', async () => {
    const tar = makeLayer([{ name: 'a', content: 'x'.repeat(2000) }, { name: 'b', content: 'y' }])
    expect((await entries(tar, false)).map((e) => e.path)).toEqual(['a', 'b'])
  })

  it('reads long names written with pax headers', async () => {
    const long = `${'deep/'.repeat(30)}file.txt`
    const out = new PassThrough()
    const done = writeTar([{ path: long, size: 3, open: () => Readable.from([Buffer.from('abc')]) }], out)
    const tar = await readAll(out)
    await done
    expect(await entries(tar)).toEqual([{ path: long, type: 'file', data: 'abc', size: 3 }])
  })

  it('fails ARCHIVE_INVALID on truncation and bad checksums', async () => {
    const tar = makeLayer([{ name: 'a', content: 'x'.repeat(2000) }])
    await expect(entries(tar.subarray(0, 1000))).rejects.toMatchObject({ code: 'ARCHIVE_INVALID' })
    await expect(entries(tar.subarray(0, 300))).rejects.toMatchObject({ code: 'ARCHIVE_INVALID' })
    const bad = Buffer.from(tar)
    bad[0] ^= 1
    await expect(entries(bad)).rejects.toMatchObject({ code: 'ARCHIVE_INVALID' })
  })

  it('accepts a stream that ends on a block boundary without end blocks', async () => {
    const tar = makeLayer([{ name: 'a', content: 'x' }])
    expect((await entries(tar.subarray(0, 1024))).map((e) => e.path)).toEqual(['a'])
  })

  it('normalises paths and flags ..', () => {
    expect(normalizeTarPath('./blobs//sha256/')).toEqual({ path: 'blobs/sha256', unsafe: false })
    expect(normalizeTarPath('/a/../../etc')).toMatchObject({ unsafe: true })
  })
})
