import { readdir, rm, stat } from 'node:fs/promises'
import { join } from 'node:path'
import { Readable, type Writable } from 'node:stream'
import { pipeline } from 'node:stream/promises'
import { setTimeout as sleep } from 'node:timers/promises'
import { describe, expect, it } from 'vitest'
import { testDir } from '../../test/helpers/conformance.js'
import { openNewFile } from './new-file.js'

/** Pipes a stream that fails at once into each target, removing its path after the failure. */
async function failAndRemove(dir: string, rounds: number, target: (path: string) => Promise<Writable>): Promise<string[]> {
  for (let i = 0; i < rounds; i++) {
    const path = join(dir, `f${i}`)
    const failing = new Readable({
      read() {
        this.destroy(new Error('cut'))
      },
    })
    await expect(target(path).then((out) => pipeline(failing, out))).rejects.toThrow('cut')
    await rm(path, { force: true })
  }
  await sleep(100)
  return readdir(dir)
}

describe('openNewFile', () => {
  it('creates the file before resolving, with the mode asked for, and refuses an existing one', async () => {
    const dir = await testDir()
    const path = join(dir, 'new')
    const out = await openNewFile(path, { mode: 0o600 })
    expect((await stat(path)).mode & 0o777).toBe(0o600 & ~process.umask())
    await pipeline(Readable.from([Buffer.from('bytes')]), out)
    expect((await stat(path)).size).toBe(5)
    await expect(openNewFile(path)).rejects.toMatchObject({ code: 'EEXIST' })
  })

  it('leaves nothing once a pipeline into it failed and its path was removed', async () => {
    const dir = await testDir()
    expect(await failAndRemove(dir, 100, openNewFile)).toEqual([])
  })
})
