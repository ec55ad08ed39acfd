import { randomBytes } from 'node:crypto'
import { type FileHandle, open, readFile, readlink, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { describe, expect, it } from 'vitest'
import { testDir } from '../../test/helpers/conformance.js'
import { DIRECT_ALIGN, DirectWriter, STAGE_BYTES, remoteFileSystem } from './direct-write.js'

/** Makes every write of `handle` after the first `okWrites` fail with `code`. */
function failWrites(handle: FileHandle, okWrites: number, code = 'ENOSPC'): FileHandle {
  let writes = 0
  const real = handle.write.bind(handle)
  handle.write = (async (...args: Parameters<typeof real>) => {
    if (++writes > okWrites) throw Object.assign(new Error(`write failed (${code})`), { code })
    return real(...args)
  }) as typeof handle.write
  return handle
}

async function newFile() {
  const path = join(await testDir(), 'file')
  return { path, plain: await open(path, 'wx+') }
}

const pieces = (data: Buffer, n: number) => Array.from({ length: Math.ceil(data.length / n) }, (_, i) => data.subarray(i * n, (i + 1) * n))

describe('DirectWriter', () => {
  it.each([0, 1, DIRECT_ALIGN - 1, DIRECT_ALIGN, STAGE_BYTES - 1, STAGE_BYTES, STAGE_BYTES + 1, 3 * STAGE_BYTES + 123_457])(
    'writes exactly the bytes given (%i bytes, in uneven chunks), through O_DIRECT where it can',
    async (size) => {
      const { path, plain } = await newFile()
      const data = randomBytes(size)
      const w = await DirectWriter.open(plain)
      expect(w).toBeDefined()
      for (const piece of pieces(data, 300_001)) await w!.write(piece)
      await w!.end()
      expect(w!.written).toBe(size)
      expect(w!.unwritten()).toEqual([])
      await w!.close()
      await plain.close()
      expect((await stat(path)).size).toBe(size)
      expect((await readFile(path)).equals(data)).toBe(true)
    },
  )

  it('writes with O_DIRECT set on its descriptor (Linux, on a file system that has it)', async () => {
    const { plain } = await newFile()
    const w = (await DirectWriter.open(plain))!
    // the flags of every descriptor of this process to the file: one of them has O_DIRECT (040000)
    const flags: number[] = []
    for (let fd = 0; fd < 1024; fd++) {
      const target = await readlink(`/proc/self/fd/${fd}`).catch(() => '')
      if (target !== (await readlink(`/proc/self/fd/${plain.fd}`))) continue
      const info = await readFile(`/proc/self/fdinfo/${fd}`, 'utf8')
      flags.push(Number.parseInt(/flags:\s+([0-7]+)/.exec(info)![1], 8))
    }
    expect(w.direct).toBe(true)
    expect(flags.some((f) => (f & 0o40000) !== 0)).toBe(true)
    await w.close()
    await plain.close()
  })

  it('is not used on network and FUSE file systems (statfs magic numbers), only on local ones', async () => {
    expect(remoteFileSystem(0x6969)).toBe('nfs')
    expect(remoteFileSystem(0xfe534d42)).toBe('smb2')
    expect(remoteFileSystem(0x65735546)).toBe('fuse')
    expect(remoteFileSystem(0xef53)).toBeUndefined() // ext2/3/4
    expect(remoteFileSystem(0x58465342)).toBeUndefined() // xfs
    expect(remoteFileSystem(0x01021994)).toBeUndefined() // tmpfs
  })

  it('BLOBCACHE_DIRECT_IO=0 turns it off; =1 makes a file that cannot have it fail (ENOTSUP)', async () => {
    const { plain } = await newFile()
    try {
      process.env.BLOBCACHE_DIRECT_IO = '0'
      expect(await DirectWriter.open(plain)).toBeUndefined()
      process.env.BLOBCACHE_DIRECT_IO = '1'
      const refused = async () => {
        throw Object.assign(new Error('invalid argument'), { code: 'EINVAL' })
      }
      await expect(DirectWriter.open(plain, { reopen: refused })).rejects.toMatchObject({ code: 'ENOTSUP' })
      const w = await DirectWriter.open(plain)
      expect(w?.direct).toBe(true)
      await w?.close()
    } finally {
      delete process.env.BLOBCACHE_DIRECT_IO
      await plain.close()
    }
  })

  it('goes on through the plain descriptor when a direct write fails, and the file is whole', async () => {
    const { path, plain } = await newFile()
    const data = randomBytes(3 * STAGE_BYTES + 5000)
    const w = (await DirectWriter.open(plain, { reopen: async () => failWrites(await open(path, 'r+'), 1, 'EINVAL') }))!
    for (const piece of pieces(data, 250_000)) await w.write(piece)
    await w.end()
    expect(w.direct).toBe(false)
    await w.close()
    await plain.close()
    expect((await readFile(path)).equals(data)).toBe(true)
  })

  it('when both descriptors fail: rejects, and written + unwritten are every byte given before the failing call', async () => {
    const { path, plain } = await newFile()
    failWrites(plain, 0)
    const data = randomBytes(4 * STAGE_BYTES)
    const w = (await DirectWriter.open(plain, { reopen: async () => failWrites(await open(path, 'r+'), 2) }))!
    let given = 0
    let failure: unknown
    for (const piece of pieces(data, 300_000)) {
      try {
        await w.write(piece)
        given += piece.length
      } catch (err) {
        failure = err
        break
      }
    }
    expect(failure).toMatchObject({ code: 'ENOSPC' })
    expect(w.written).toBe(2 * STAGE_BYTES)
    const kept = Buffer.concat([(await readFile(path)).subarray(0, w.written), ...w.unwritten()])
    // the stages may also hold the start of the chunk whose write failed
    expect(kept.length).toBeGreaterThanOrEqual(given)
    expect(kept.equals(data.subarray(0, kept.length))).toBe(true)
    await w.close()
    await plain.close()
  })

  it('a failure of the last, padded write rejects end()', async () => {
    const { path, plain } = await newFile()
    failWrites(plain, 0)
    const w = (await DirectWriter.open(plain, { reopen: async () => failWrites(await open(path, 'r+'), 1) }))!
    const data = randomBytes(STAGE_BYTES + 10)
    await w.write(data)
    await expect(w.end()).rejects.toMatchObject({ code: 'ENOSPC' })
    expect(w.written).toBe(STAGE_BYTES)
    expect(Buffer.concat(w.unwritten()).equals(data.subarray(STAGE_BYTES))).toBe(true)
    await w.close()
    await plain.close()
  })
})
