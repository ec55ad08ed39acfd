import { readdir, readlink, writeFile } from 'node:fs/promises'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { describe, expect, it } from 'vitest'
import { readAll, testDir } from '../../test/helpers/conformance.js'
import { fileRanges, streamRanges } from './ranges.js'

async function collect(gen: AsyncIterable<Readable>): Promise<string[]> {
  const out: string[] = []
  for await (const s of gen) out.push((await readAll(s)).toString())
  return out
}

/** How many descriptors of this process are open on `file` (Linux /proc). */
async function openDescriptors(file: string): Promise<number> {
  let n = 0
  for (const fd of await readdir('/proc/self/fd')) {
    if ((await readlink(join('/proc/self/fd', fd)).catch(() => '')) === file) n++
  }
  return n
}

describe('fileRanges (TestStreamChunksFromFile)', () => {
  it('reads "23" then "5" from "123456789", then ends', async () => {
    const file = join(await testDir(), 'f')
    await writeFile(file, '123456789')
    const gen = fileRanges(file, [{ offset: 1, length: 2 }, { offset: 4, length: 1 }])
    expect(await collect(gen)).toEqual(['23', '5'])
  })

  it('reads to the end with length -1, in the order given, and empty chunks', async () => {
    const file = join(await testDir(), 'f')
    await writeFile(file, '123456789')
    const chunks = [{ offset: 6, length: -1 }, { offset: 0, length: 3 }, { offset: 5, length: 0 }]
    expect(await collect(fileRanges(file, chunks))).toEqual(['789', '123', ''])
  })

  it('lets streams be consumed after the generator has finished', async () => {
    const file = join(await testDir(), 'f')
    await writeFile(file, '123456789')
    const streams: Readable[] = []
    for await (const s of fileRanges(file, [{ offset: 0, length: 2 }, { offset: 7, length: 2 }])) streams.push(s)
    expect((await Promise.all(streams.map(readAll))).map(String)).toEqual(['12', '89'])
  })

  it('closes the file once every chunk stream has ended or been destroyed', async () => {
    const file = join(await testDir(), 'f')
    await writeFile(file, '123456789')
    // every stream read to its end
    expect(await collect(fileRanges(file, [{ offset: 1, length: 2 }, { offset: 4, length: -1 }, { offset: 0, length: 0 }]))).toEqual(['23', '56789', ''])
    await expect.poll(() => openDescriptors(file)).toBe(0)
    // streams consumed after the generator finished
    const later: Readable[] = []
    for await (const s of fileRanges(file, [{ offset: 0, length: 2 }, { offset: 7, length: 2 }])) later.push(s)
    expect((await Promise.all(later.map(readAll))).map(String)).toEqual(['12', '89'])
    await expect.poll(() => openDescriptors(file)).toBe(0)
    // a consumer that destroys a stream unread, and one that stops iterating early
    for await (const s of fileRanges(file, [{ offset: 0, length: 3 }, { offset: 3, length: 3 }])) {
      s.destroy()
      break
    }
    await expect.poll(() => openDescriptors(file)).toBe(0)
  })

  it('rejects chunks outside the file with SIZE_INVALID', async () => {
    const file = join(await testDir(), 'f')
    await writeFile(file, '123456789')
    await expect(collect(fileRanges(file, [{ offset: 8, length: 2 }]))).rejects.toMatchObject({ code: 'SIZE_INVALID' })
    await expect(collect(fileRanges(file, [{ offset: -1, length: 1 }]))).rejects.toMatchObject({ code: 'SIZE_INVALID' })
  })
})

describe('streamRanges (source without getBlobAt)', () => {
  it('cuts ranges from one sequential read, reopening for a range behind the position', async () => {
    let opened = 0
    const open = async () => {
      opened++
      return Readable.from([Buffer.from('1234'), Buffer.from('56789')])
    }
    const chunks = [{ offset: 1, length: 2 }, { offset: 4, length: 1 }, { offset: 5, length: -1 }, { offset: 0, length: 1 }]
    expect(await collect(streamRanges(open, chunks))).toEqual(['23', '5', '6789', '1'])
    expect(opened).toBe(2)
  })

  it('fails the chunk when the blob is shorter than the range', async () => {
    const open = async () => Readable.from([Buffer.from('123')])
    await expect(collect(streamRanges(open, [{ offset: 1, length: 5 }]))).rejects.toMatchObject({ code: 'SIZE_INVALID' })
  })
})
