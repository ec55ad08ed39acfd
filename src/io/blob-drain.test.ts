import { readFile } from 'node:fs/promises'
import { join } from 'node:path'
import { PassThrough, Readable } from 'node:stream'
import { describe, expect, it } from 'vitest'
import { testDir } from '../../test/helpers/conformance.js'
import { BlobFile } from './blob-file.js'
import { drainInto } from './blob-drain.js'

/** Records every 'error' a stream emits while nothing listens for it (an uncaught exception). */
function unheardErrors(stream: Readable): unknown[] {
  const unheard: unknown[] = []
  const emit = stream.emit.bind(stream)
  stream.emit = ((event: string | symbol, ...args: unknown[]) => {
    if (event === 'error' && stream.listenerCount('error') === 0) {
      unheard.push(args[0])
      return false
    }
    return emit(event, ...args)
  }) as typeof stream.emit
  return unheard
}

const tick = () => new Promise((resolve) => setImmediate(resolve))

describe('drainInto', () => {
  it('writes every chunk and resolves the count', async () => {
    const dir = await testDir()
    const file = await BlobFile.create(join(dir, 'f'), { algorithm: 'sha256' })
    const written = await drainInto(Readable.from([Buffer.from('abc'), Buffer.from('de')]), file, { size: 5 })
    await file.close()
    expect(written.bytes).toBe(5)
    expect(await readFile(join(dir, 'f'), 'utf8')).toBe('abcde')
  })

  it('a signal aborted before it starts rejects with the reason, and the stream it destroys has a listener for that error', async () => {
    // a copy aborted while the destination was still creating its file: the stream, already
    // left by the copy's pipeline, was destroyed with the reason and nobody heard the error
    const dir = await testDir()
    const file = await BlobFile.create(join(dir, 'f'))
    const stream = new PassThrough()
    const unheard = unheardErrors(stream)
    const reason = new Error('another blob failed')
    await expect(drainInto(stream, file, { signal: AbortSignal.abort(reason) })).rejects.toBe(reason)
    await file.close()
    await tick()
    expect(stream.destroyed).toBe(true)
    expect(unheard).toEqual([])
  })

  it('an abort while it runs rejects with the reason, and nothing goes unheard', async () => {
    const dir = await testDir()
    const file = await BlobFile.create(join(dir, 'f'))
    const stream = new PassThrough()
    const unheard = unheardErrors(stream)
    const ac = new AbortController()
    const draining = drainInto(stream, file, { signal: ac.signal })
    stream.write(Buffer.from('partial'))
    await tick()
    const reason = new Error('stop')
    ac.abort(reason)
    await expect(draining).rejects.toBe(reason)
    await file.close()
    await tick()
    expect(unheard).toEqual([])
  })

  it('more bytes than the size fail SIZE_INVALID at once', async () => {
    const dir = await testDir()
    const file = await BlobFile.create(join(dir, 'f'))
    await expect(drainInto(Readable.from([Buffer.alloc(10)]), file, { size: 4, what: 'blob x' })).rejects.toMatchObject({
      code: 'SIZE_INVALID',
      message: expect.stringMatching(/blob x/),
    })
    await file.close()
  })
})
