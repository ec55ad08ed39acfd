import { describe, expect, it } from 'vitest'
import { type BodySink, Chunk } from './chunks.js'

/** A sink that records what it was given. */
function sink(): BodySink & { got: Buffer[]; destroyed: boolean } {
  const got: Buffer[] = []
  return { got, destroyed: false, write: (b: Buffer) => (got.push(b), true) }
}

describe('Chunk', () => {
  it('keeps the buffers it was given, without joining them, and slices from an offset', () => {
    const data = Buffer.from('abcdefgh')
    const chunk = new Chunk(8)
    chunk.add(data.subarray(0, 3))
    expect(chunk.complete).toBe(false)
    chunk.add(data.subarray(3))
    expect(chunk.complete).toBe(true)
    expect(Buffer.concat(chunk.from(5)).toString()).toBe('fgh')
    expect(Buffer.concat(chunk.from(3)).toString()).toBe('defgh')
    expect(chunk.from(8)).toEqual([])
    expect(chunk.parts.every((p) => p.buffer === data.buffer)).toBe(true)
    expect(() => chunk.add(Buffer.from('x'))).toThrow(RangeError)
  })

  it('streams bytes as they arrive, from an offset, and resolves at the last one', async () => {
    const chunk = new Chunk(10)
    chunk.add(Buffer.from('0123'))
    const out = sink()
    let done = false
    const streaming = chunk.streamTo(out, 2).then(() => (done = true))
    await new Promise((r) => setImmediate(r))
    expect(Buffer.concat(out.got).toString()).toBe('23')
    expect(done).toBe(false)
    chunk.add(Buffer.from('456'))
    await new Promise((r) => setImmediate(r))
    expect(Buffer.concat(out.got).toString()).toBe('23456')
    chunk.add(Buffer.from('789'))
    await streaming
    expect(Buffer.concat(out.got).toString()).toBe('23456789')
    await expect(chunk.whenComplete()).resolves.toBeUndefined()
  })

  it('rejects a waiting sender when it fails, and stops writing to a destroyed sink', async () => {
    const chunk = new Chunk(10)
    chunk.add(Buffer.from('ab'))
    const boom = new Error('source failed')
    const streaming = chunk.streamTo(sink())
    const waiting = chunk.whenComplete()
    chunk.fail(boom)
    await expect(streaming).rejects.toBe(boom)
    await expect(waiting).rejects.toBe(boom)
    expect(chunk.failed).toBe(true)

    const other = new Chunk(4)
    const out = sink()
    const s = other.streamTo(out)
    other.add(Buffer.from('12'))
    await new Promise((r) => setImmediate(r))
    out.destroyed = true
    other.add(Buffer.from('34'))
    await s
    expect(Buffer.concat(out.got).toString()).toBe('12')
  })
})
