import { readdir, readFile, utimes, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { testDir } from '../../test/helpers/conformance.js'
import { digestOf } from '../digest.js'
import { withFileLock } from '../file-lock.js'
import {
  addCompressedVariant,
  formatCompressedNote,
  knownVariants,
  noteLockName,
  parseCompressedNote,
  readCompressedNote,
  readDecompressedNote,
  writeDecompressedNote,
} from './notes.js'

const d = (s: string) => digestOf(s)
const U = d('uncompressed')
const G = d('gzip variant')
const Z = d('zstd variant')

describe('.compressed note format', () => {
  it('reads a legacy one-line note as gzip', () => {
    expect([...parseCompressedNote(G)]).toEqual([[G, 'gzip']])
  })

  it('reads lines, trimming, skipping blanks and bad digests, splitting at the first space', () => {
    const text = `\n  ${G} gzip \n\n${Z} zstd\nnot-a-digest gzip\n${d('x')} zstd:chunked extra\n`
    const note = parseCompressedNote(text)
    expect(note.get(G)).toBe('gzip')
    expect(note.get(Z)).toBe('zstd')
    expect(note.get(d('x'))).toBe('zstd:chunked extra')
    expect(note.size).toBe(3)
    expect(knownVariants(note).map(([k]) => k).sort()).toEqual([G, Z].sort())
  })

  it('writes a single gzip variant in the legacy form, and otherwise sorted lines, without a trailing newline', () => {
    expect(formatCompressedNote(new Map([[G, 'gzip']]))).toBe(G)
    expect(formatCompressedNote(new Map([[Z, 'zstd']]))).toBe(`${Z} zstd`)
    const two = formatCompressedNote(new Map([[Z, 'zstd'], [G, 'gzip']]))
    expect(two).toBe([`${G} gzip`, `${Z} zstd`].sort().join('\n'))
    expect(two.endsWith('\n')).toBe(false)
  })
})

describe('note files', () => {
  it('merges variants read-modify-write and keeps unknown algorithms', async () => {
    const dir = await testDir()
    const other = d('other')
    await writeFile(join(dir, `${U}.compressed`), `${other} lz4`)
    await addCompressedVariant(dir, U, G, 'gzip')
    await addCompressedVariant(dir, U, Z, 'zstd')
    const note = await readCompressedNote(dir, U)
    expect(Object.fromEntries(note)).toEqual({ [G]: 'gzip', [Z]: 'zstd', [other]: 'lz4' })
    expect((await readdir(dir)).filter((n) => n.startsWith('.tmp-'))).toEqual([])
  })

  it('loses no entry when many writers add at once', async () => {
    const dir = await testDir()
    const variants = Array.from({ length: 40 }, (_, i) => d(`variant ${i}`))
    await Promise.all(variants.map((v, i) => addCompressedVariant(dir, U, v, i % 2 ? 'gzip' : 'zstd')))
    expect([...(await readCompressedNote(dir, U)).keys()].sort()).toEqual(variants.sort())
  })

  it('reads and writes .decompressed notes', async () => {
    const dir = await testDir()
    expect(await readDecompressedNote(dir, G)).toBeUndefined()
    await writeDecompressedNote(dir, G, U)
    expect(await readFile(join(dir, `${G}.decompressed`), 'utf8')).toBe(U)
    expect(await readDecompressedNote(dir, G)).toBe(U)
    await writeFile(join(dir, `${Z}.decompressed`), 'garbage')
    expect(await readDecompressedNote(dir, Z)).toBeUndefined()
  })
})

describe('note locks (withFileLock on noteLockName)', () => {
  it('serialises holders', async () => {
    const dir = await testDir()
    const lock = join(dir, noteLockName('x'))
    let inside = 0
    let max = 0
    await Promise.all(
      Array.from({ length: 10 }, () =>
        withFileLock(lock, async () => {
          inside++
          max = Math.max(max, inside)
          await new Promise((r) => setTimeout(r, 2))
          inside--
        }),
      ),
    )
    expect(max).toBe(1)
    expect(await readdir(dir)).toEqual([])
  })

  it('breaks a stale lock left by a dead process', async () => {
    const dir = await testDir()
    const lock = join(dir, noteLockName('x'))
    // the pid-only form of earlier versions is torn for this lock, and broken once it is old
    await writeFile(lock, '99999\n')
    const old = new Date(Date.now() - 60_000)
    await utimes(lock, old, old)
    expect(await withFileLock(lock, async () => 'ran', { staleMs: 10_000 })).toBe('ran')
    expect(await readdir(dir)).toEqual([])
  })

  it('times out behind a fresh lock with CACHE_INVALID', async () => {
    const dir = await testDir()
    const lock = join(dir, noteLockName('x'))
    await writeFile(lock, '1\n')
    await expect(withFileLock(lock, async () => 'ran', { timeoutMs: 100 })).rejects.toMatchObject({ code: 'CACHE_INVALID' })
  })
})

