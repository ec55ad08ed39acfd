import { randomBytes } from 'node:crypto'
import { readdir } from 'node:fs/promises'
import { setTimeout as sleep } from 'node:timers/promises'
import { gzipSync } from 'node:zlib'
import { describe, expect, it } from 'vitest'
import { testDir } from '../../test/helpers/conformance.js'
import type { DetectedAlgorithm } from '../types.js'
import { startDecompression } from './variants.js'

describe('startDecompression', () => {
  // The temporary file must exist before anything can fail: a file opened in the background
  // used to appear after the failure had removed its path, and stayed in the cache directory.
  it.each([
    ['gzip', 'gzip', gzipSync(randomBytes(1 << 16))],
    ['xz (on the main thread)', 'xz', Buffer.from([0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00, 1, 2, 3])],
  ])('an abort as soon as it starts leaves no temporary file (%s)', async (_name, algorithm, head) => {
    const dir = await testDir()
    const errors: unknown[] = []
    const jobs = Array.from({ length: 60 }, (_, i) => {
      const job = startDecompression(dir, `sha256:base${i}`, algorithm as DetectedAlgorithm, (_w, err) => errors.push(err))
      void job.write(head.subarray(0, 32))
      job.abort()
      return job.done
    })
    expect(await Promise.all(jobs)).toEqual(jobs.map(() => undefined))
    await sleep(200)
    expect(await readdir(dir)).toEqual([])
    expect(errors).toEqual([])
  })
})
