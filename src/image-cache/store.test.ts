// The content store: linuxkit-cache.md section 5, scenario 37, and the ingest contract.
import { readdir, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { digestHex, digestOf } from '../digest.js'
import { readAll, testDir } from '../../test/helpers/conformance.js'
import { AMD64, image, putImage } from '../../test/helpers/image-cache-fixtures.js'
import { ImageCache } from './cache.js'
import { AlreadyExistsError } from './store.js'

describe('ContentStore', () => {
  it('37: ingest and commit puts the blob under blobs/sha256, getContent reads it, the ingest goes; a duplicate is AlreadyExists', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const store = cache.store()
    const data = Buffer.from('buildkit wrote this '.repeat(1000))
    const digest = digestOf(data)
    const w = await store.writer({ ref: 'layer-1', total: data.length })
    await w.write(data.subarray(0, 5000))
    await w.write(data.subarray(5000))
    expect((await store.status('layer-1')).offset).toBe(data.length)
    expect(await w.commit(data.length, digest)).toBe(digest)
    expect((await stat(join(dir, 'blobs', 'sha256', digestHex(digest)))).mode & 0o777).toBe(0o444)
    expect(await readAll(await cache.getContent(digest))).toEqual(data)
    expect(await readdir(join(dir, 'ingest'))).toEqual([])
    expect(await store.info(digest)).toMatchObject({ digest, size: data.length })
    expect((await store.list()).map((i) => i.digest)).toEqual([digest])

    const again = await store.writer({ ref: 'layer-1-again' })
    await again.write(data)
    const err = await again.commit(data.length, digest).catch((e: unknown) => e)
    expect(err).toBeInstanceOf(AlreadyExistsError)
    expect(err).toMatchObject({ code: 'ALREADY_EXISTS', digest })
    expect(await readdir(join(dir, 'ingest'))).toEqual([])
    await expect(store.writer({ ref: 'x', expected: digest })).rejects.toMatchObject({ code: 'ALREADY_EXISTS' })
  })

  it('checks size and digest at commit, keeping the ingest', async () => {
    const store = (await ImageCache.open(await testDir())).store()
    const w = await store.writer({ ref: 'r' })
    await w.write(Buffer.from('abc'))
    await expect(w.commit(4)).rejects.toMatchObject({ code: 'SIZE_INVALID' })
    await expect(w.commit(3, digestOf('abd'))).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
    await w.close()
    expect((await store.status('r')).offset).toBe(3)
  })

  it('resumes an ingest, and refuses a second live writer of the same ref', async () => {
    const store = (await ImageCache.open(await testDir())).store()
    const w = await store.writer({ ref: 'resume' })
    await expect(store.writer({ ref: 'resume' })).rejects.toMatchObject({ code: 'DENIED' })
    await w.write(Buffer.from('hello '))
    await w.close()
    const w2 = await store.writer({ ref: 'resume' })
    expect(w2.offset).toBe(6)
    await w2.write(Buffer.from('world'))
    const d = await w2.commit(11)
    expect(d).toBe(digestOf('hello world'))
    expect(await store.ingests()).toEqual([])
  })

  it('refuses to delete a blob an image uses; deletes others; BLOB_UNKNOWN when absent', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const im = await image(AMD64, 31)
    await cache.descriptorWrite('used:1', await putImage(dir, im))
    const store = cache.store()
    await expect(store.delete(im.layers[0].digest)).rejects.toMatchObject({ code: 'DENIED' })
    const w = await store.writer({ ref: 'loose' })
    await w.write(Buffer.from('loose'))
    const d = await w.commit(5)
    await store.delete(d)
    await expect(store.info(d)).rejects.toMatchObject({ code: 'BLOB_UNKNOWN' })
    await expect(store.delete(d)).rejects.toMatchObject({ code: 'BLOB_UNKNOWN' })
  })

  it('gc removes abandoned ingests only', async () => {
    const dir = await testDir()
    const cache = await ImageCache.open(dir)
    const store = cache.store()
    const open = await store.writer({ ref: 'live' })
    const dead = await store.writer({ ref: 'dead' })
    await dead.write(Buffer.from('x'))
    await dead.close()
    const report = await cache.gc({ graceMs: 0 })
    expect(report.leftovers).toBe(1)
    expect((await store.ingests()).map((s) => s.ref)).toEqual(['live'])
    await open.close()
  })
})
