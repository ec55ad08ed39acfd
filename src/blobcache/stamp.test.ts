import { copyFile, lstat, mkdtemp, open, rename, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { afterEach, beforeEach, describe, expect, it } from 'vitest'
import { digestOf } from '../digest.js'
import { entryIntact } from './directory.js'
import { hasVerifiedStamp, stampVerified, touchEntry } from './stamp.js'

describe('verification stamps', () => {
  let dir: string
  let path: string
  const bytes = Buffer.from('layer bytes '.repeat(1000))
  const digest = digestOf(bytes)

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'blobcache-stamp-'))
    path = join(dir, digest)
    await writeFile(path, bytes)
  })
  afterEach(() => rm(dir, { recursive: true, force: true }))

  it('a fresh file has no stamp; a stamped one has, and keeps it when used', async () => {
    expect(await hasVerifiedStamp(path)).toBe(false)
    await stampVerified(path, bytes.length)
    expect(await hasVerifiedStamp(path)).toBe(true)
    await touchEntry(path)
    await touchEntry(path)
    await touchEntry(path)
    expect(await hasVerifiedStamp(path)).toBe(true)
  })

  it('survives the conversion of times for any microsecond (500 stamps at spread times)', async () => {
    const base = Date.now()
    for (let i = 0; i < 500; i++) {
      await stampVerified(path, bytes.length, base + i * 7919)
      expect(await hasVerifiedStamp(path)).toBe(true)
    }
  })

  it('using an unstamped file never stamps it, and sets its atime for LRU', async () => {
    const before = await lstat(path, { bigint: true })
    await new Promise((r) => setTimeout(r, 20))
    await touchEntry(path)
    const after = await lstat(path, { bigint: true })
    expect(await hasVerifiedStamp(path)).toBe(false)
    expect(after.atimeNs).toBeGreaterThan(before.atimeNs)
  })

  it('is not given when the size differs from the verified one', async () => {
    await stampVerified(path, bytes.length + 1)
    expect(await hasVerifiedStamp(path)).toBe(false)
  })

  it('is lost by a write in place, a truncation, a rename and a copy', async () => {
    await stampVerified(path, bytes.length)
    const fh = await open(path, 'r+')
    await fh.write(Buffer.from('X'), 0, 1, 10)
    await fh.close()
    expect(await hasVerifiedStamp(path)).toBe(false)

    await writeFile(path, bytes)
    await stampVerified(path, bytes.length)
    await writeFile(path, bytes.subarray(0, 100))
    expect(await hasVerifiedStamp(path)).toBe(false)

    await writeFile(path, bytes)
    await stampVerified(path, bytes.length)
    const other = join(dir, digestOf(Buffer.from('another blob')))
    await rename(path, other)
    expect(await hasVerifiedStamp(other)).toBe(false)

    await stampVerified(other, bytes.length)
    await copyFile(other, path)
    expect(await hasVerifiedStamp(path)).toBe(false)
  })

  it('entryIntact takes a stamped entry as it is and hashes (then stamps) any other', async () => {
    expect(await entryIntact(path, digest)).toBe(true) // hashed
    expect(await hasVerifiedStamp(path)).toBe(true)
    const wrong = digestOf(Buffer.from('not these bytes'))
    const elsewhere = join(dir, wrong)
    await writeFile(elsewhere, bytes)
    expect(await entryIntact(elsewhere, wrong)).toBe(false)
    expect(await hasVerifiedStamp(elsewhere)).toBe(false)
  })

  it('a symbolic link is never stamped', async () => {
    const { symlink } = await import('node:fs/promises')
    const link = join(dir, digestOf(Buffer.from('link')))
    await symlink(path, link)
    await stampVerified(link)
    expect(await hasVerifiedStamp(link)).toBe(false)
  })
})
