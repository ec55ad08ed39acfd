import { mkdir, readFile, readdir, utimes, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { testDir } from '../../test/helpers/conformance.js'
import { digestOf } from '../digest.js'
import { CacheDirectory, findBlob } from './directory.js'
import { classifyName } from './files.js'

const names = async (dir: string) => (await readdir(dir)).sort()

async function age(path: string, msAgo: number): Promise<void> {
  const t = new Date(Date.now() - msAgo)
  await utimes(path, t, t)
}

/** A cache with an uncompressed layer U, its gzip variant C and their notes, and a config K. */
async function filled() {
  const dir = await testDir()
  const u = Buffer.from('u'.repeat(1000))
  const c = Buffer.from('c'.repeat(300))
  const k = Buffer.from('{"k":1}')
  const [U, C, K] = [digestOf(u), digestOf(c), digestOf(k)]
  await writeFile(join(dir, U), u)
  await writeFile(join(dir, C), c)
  await writeFile(join(dir, `${K}.config`), k)
  await writeFile(join(dir, `${U}.compressed`), C)
  await writeFile(join(dir, `${C}.decompressed`), U)
  return { dir, U, C, K, u, c, k }
}

describe('classifyName', () => {
  it('recognises entries, notes, our temporaries and Go temporaries', () => {
    const D = digestOf('x')
    expect(classifyName(D)).toEqual({ kind: 'blob', digest: D })
    expect(classifyName(`${D}.config`)).toEqual({ kind: 'config', digest: D })
    expect(classifyName(`${D}.compressed`)).toEqual({ kind: 'note', digest: D })
    expect(classifyName(`${D}.decompressed`)).toEqual({ kind: 'note', digest: D })
    expect(classifyName(`.tmp-${D}-abc`).kind).toBe('temp')
    expect(classifyName(`${D}123456`).kind).toBe('temp')
    expect(classifyName(`${D}.config98765`).kind).toBe('temp')
    expect(classifyName('sha256:ABC').kind).toBe('other')
    expect(classifyName('README').kind).toBe('other')
  })
})

describe('CacheDirectory', () => {
  it('lists entries with kinds, digests and sizes', async () => {
    const { dir, U, C, K } = await filled()
    await mkdir(join(dir, 'subdir'))
    const list = await new CacheDirectory(dir).list()
    const byName = Object.fromEntries(list.map((e) => [e.name, e]))
    expect(byName[U]).toMatchObject({ kind: 'blob', digest: U, size: 1000 })
    expect(byName[`${K}.config`]).toMatchObject({ kind: 'config', digest: K })
    expect(byName[`${C}.decompressed`]).toMatchObject({ kind: 'note', digest: C, size: U.length })
    expect(byName.subdir).toMatchObject({ kind: 'other', size: 0 })
    expect(byName[U].mtime).toBeInstanceOf(Date)
  })

  it('has() and find() look at <digest> then <digest>.config', async () => {
    const { dir, U, K } = await filled()
    const cd = new CacheDirectory(dir)
    expect(await cd.has(U)).toBe(true)
    expect(await cd.has(K)).toBe(true)
    expect(await cd.find(K)).toMatchObject({ isConfig: true, name: `${K}.config` })
    expect(await cd.has(digestOf('nope'))).toBe(false)
    await expect(cd.has('sha256:../x')).rejects.toMatchObject({ code: 'DIGEST_INVALID' })
  })

  it('findBlob treats a wrong-size entry as missing and removes it', async () => {
    const { dir, U } = await filled()
    expect(await findBlob(dir, U, 999)).toBeUndefined()
    expect(await names(dir)).not.toContain(U)
  })

  it('verify re-hashes entries and removes corrupt ones and unreadable notes', async () => {
    const { dir, U, C, K } = await filled()
    await writeFile(join(dir, C), 'tampered')
    await writeFile(join(dir, `${K}.decompressed`), 'not a digest')
    const r = await new CacheDirectory(dir).verify()
    expect(r.removed.sort()).toEqual([C, `${K}.decompressed`].sort())
    expect(r.checked).toBe(6)
    expect(r.bytesChecked).toBe(1000 + 'tampered'.length + 7)
    expect(await names(dir)).toEqual([U, `${U}.compressed`, `${C}.decompressed`, `${K}.config`].sort())
  })

  it('prune evicts least recently used entries with their notes down to maxBytes', async () => {
    const { dir, U, C, K } = await filled()
    await age(join(dir, U), 3000)
    await age(join(dir, C), 1000)
    const r = await new CacheDirectory(dir).prune({ maxBytes: 500 })
    // U (oldest, with U.compressed) goes first; then C.decompressed points nowhere and goes too
    expect(r.removed.sort()).toEqual([U, `${U}.compressed`, `${C}.decompressed`].sort())
    expect(await names(dir)).toEqual([C, `${K}.config`].sort())
    expect(r.keptBytes).toBe(300 + 7)
    expect(r.freedBytes).toBe(1000 + C.length + U.length)
  })

  it('prune evicts entries unused for olderThan and keeps the rest', async () => {
    const { dir, U, C, K } = await filled()
    await age(join(dir, `${K}.config`), 10 * 24 * 3600_000)
    const r = await new CacheDirectory(dir).prune({ olderThan: 24 * 3600_000 })
    expect(r.removed).toEqual([`${K}.config`])
    expect(await names(dir)).toEqual([C, `${C}.decompressed`, U, `${U}.compressed`].sort())
  })

  it('prune removes temporaries older than an hour, Go-style ones included, and keeps fresh ones', async () => {
    const dir = await testDir()
    const D = digestOf('x')
    for (const n of [`.tmp-${D}-old`, `${D}4242`, `.tmp-${D}-fresh`]) await writeFile(join(dir, n), 'partial')
    await age(join(dir, `.tmp-${D}-old`), 2 * 3600_000)
    await age(join(dir, `${D}4242`), 2 * 3600_000)
    const r = await new CacheDirectory(dir).prune()
    expect(r.removed.sort()).toEqual([`.tmp-${D}-old`, `${D}4242`].sort())
    expect(await names(dir)).toEqual([`.tmp-${D}-fresh`])
  })

  it('prune drops note entries whose variant is gone, keeping the others', async () => {
    const { dir, U, C } = await filled()
    const Z = digestOf('gone')
    await writeFile(join(dir, `${U}.compressed`), `${C} gzip\n${Z} zstd`)
    await new CacheDirectory(dir).prune()
    expect(await readFile(join(dir, `${U}.compressed`), 'utf8')).toBe(C)
  })

  it('clear removes everything, foreign files and subdirectories too, and keeps the directory', async () => {
    const { dir } = await filled()
    await mkdir(join(dir, 'sub'))
    await writeFile(join(dir, 'sub', 'f'), 'x')
    await new CacheDirectory(dir).clear()
    expect(await names(dir)).toEqual([])
  })

  it('fails CACHE_INVALID for a missing directory', async () => {
    const dir = join(await testDir(), 'missing')
    const cd = new CacheDirectory(dir)
    await expect(cd.list()).rejects.toMatchObject({ code: 'CACHE_INVALID' })
    await expect(cd.clear()).rejects.toMatchObject({ code: 'CACHE_INVALID' })
    await expect(cd.prune()).rejects.toMatchObject({ code: 'CACHE_INVALID' })
    expect(() => new CacheDirectory('')).toThrow(expect.objectContaining({ code: 'CACHE_INVALID' }))
  })
})
