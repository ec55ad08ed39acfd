// When the cache writes a large blob's file with direct I/O (skipping the page cache): only
// when nothing reads that file again soon. A local destination that hard-links it from the same
// device takes it unread; one on another device copies it (reads it), as does an archive
// destination at commit; `compress` mode reads a new uncompressed entry to make its variant.
import { randomBytes } from 'node:crypto'
import { existsSync } from 'node:fs'
import { mkdtemp, rm } from 'node:fs/promises'
import { join } from 'node:path'
import { Readable } from 'node:stream'
import { afterEach, describe, expect, it, vi } from 'vitest'
import { testDir } from '../../test/helpers/conformance.js'
import { makeLayer } from '../../test/helpers/make-layer.js'
import { MemoryStore, memoryTransport } from '../../test/helpers/memory-transport.js'
import { digestOf } from '../digest.js'
import { DirectWriter } from '../io/direct-write.js'
import { DirReference } from '../transports/dir.js'
import { OciArchiveReference } from '../transports/oci-archive.js'
import type { ImageReference } from '../types.js'
import { BlobCache } from './reference.js'

const layer = makeLayer([{ name: 'big', content: randomBytes(3 << 20) }])
const small = makeLayer([{ name: 'small', content: Buffer.from('small') }])

afterEach(() => {
  vi.restoreAllMocks()
})

/** The DirectWriter.open calls made while `layer` and `small` go through a cache over `ref`. */
async function directOpens(ref: ImageReference, mode: 'preserve' | 'compress' = 'preserve'): Promise<number> {
  const cache = new BlobCache(ref, await testDir(), mode)
  const spy = vi.spyOn(DirectWriter, 'open')
  const dest = await cache.newImageDestination()
  try {
    for (const blob of [layer, small]) {
      const stored = await dest.putBlob(Readable.from([blob]), { digest: digestOf(blob), size: blob.length })
      expect(stored.digest).toBe(digestOf(blob))
    }
    expect((await cache.hasBlob({ digest: digestOf(layer), size: layer.length })).present).toBe(true)
  } finally {
    await dest.close()
  }
  return spy.mock.calls.length
}

describe('direct writes of cache files', () => {
  it('are used for a large blob a dir: destination on the same device hard-links', async () => {
    expect(await directOpens(new DirReference(join(await testDir(), 'image')))).toBe(1)
  })

  it('are used for a large blob teed to a destination that reads the stream', async () => {
    expect(await directOpens(memoryTransport(new MemoryStore()).parseReference('img'))).toBe(1)
  })

  it.skipIf(!existsSync('/dev/shm'))('are not used when a dir: destination on another device copies the file', async () => {
    // /dev/shm is a tmpfs, another device than the test directory
    const other = await mkdtemp('/dev/shm/blobcache-test-')
    try {
      expect(await directOpens(new DirReference(join(other, 'image')))).toBe(0)
    } finally {
      await rm(other, { recursive: true, force: true })
    }
  })

  it('are not used for an archive destination (its files are read again at commit)', async () => {
    expect(await directOpens(new OciArchiveReference(join(await testDir(), 'out.tar'), 'img:1'))).toBe(0)
  })

  it('are not used in compress mode (the variant is made from the new entry)', async () => {
    expect(await directOpens(new DirReference(join(await testDir(), 'image')), 'compress')).toBe(0)
  })
})
