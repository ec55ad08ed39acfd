import { Readable } from 'node:stream'
import { describe, expect, it } from 'vitest'
import { readChunks } from './chunks.js'

describe('readChunks', () => {
  it('cuts a stream into chunks of exactly the size, without joining its buffers', async () => {
    const data = Buffer.from('abcdefghijklmnopqrstuvwxyz')
    const pieces = [data.subarray(0, 3), data.subarray(3, 4), data.subarray(4, 20), data.subarray(20)]
    const chunks = []
    for await (const c of readChunks(Readable.from(pieces), 8)) chunks.push(c)
    expect(chunks.map((c) => c.length)).toEqual([8, 8, 8, 2])
    expect(chunks.map((c) => Buffer.concat(c.parts).toString())).toEqual(['abcdefgh', 'ijklmnop', 'qrstuvwx', 'yz'])
    expect(Buffer.concat(chunks[0].from(5)).toString()).toBe('fgh')
    expect(Buffer.concat(chunks[0].from(3)).toString()).toBe('defgh')
    expect(chunks[0].from(8)).toEqual([])
    expect(chunks[1].parts.every((p) => p.buffer === data.buffer)).toBe(true)
  })

  it('yields nothing for an empty stream', async () => {
    const chunks = []
    for await (const c of readChunks(Readable.from([]), 8)) chunks.push(c)
    expect(chunks).toEqual([])
  })
})
