import { Writable } from 'node:stream'
import { describe, expect, it } from 'vitest'
import type { SharedStats, SharedTier } from '../blobcache/index.js'
import { emptySharedStats } from '../blobcache/stats.js'
import type { CliIO } from './io.js'
import { main } from './main.js'
import { SharedReporter, progressLine, sharedFlagsProblem } from './shared-cache.js'

class Capture extends Writable {
  text = ''
  constructor(readonly isTTY = false) {
    super()
  }
  override _write(chunk: Buffer, _enc: BufferEncoding, cb: () => void): void {
    this.text += chunk.toString('utf8')
    cb()
  }
}

function io(ttyErr = false): CliIO & { stdout: Capture; stderr: Capture } {
  return { stdout: new Capture(), stderr: new Capture(ttyErr), isTTY: false, env: {} }
}

/** A tier whose flush reports the given progress steps, then resolves `stats`. */
function tierFlushing(steps: { done: number; total: number; bytes: number }[], stats: SharedStats = emptySharedStats()) {
  return {
    name: 'docker://127.0.0.1:5000/cache',
    stats,
    async flush(opts: { onProgress?: (p: { done: number; total: number; bytes: number }) => void }) {
      for (const s of steps) opts.onProgress?.(s)
      return stats
    },
  } as unknown as SharedTier
}

describe('copy --shared-cache flags', () => {
  it('are usage errors (exit 2) without --blob-cache, with a non-docker:// value, or alone', async () => {
    const cases: [string[], RegExp][] = [
      [['--shared-cache', 'docker://127.0.0.1:5000/cache'], /--shared-cache needs --blob-cache/],
      [['--blob-cache', '/tmp/c', '--shared-cache', 'oci:/tmp/layout'], /must name a registry repository/],
      [['--blob-cache', '/tmp/c', '--shared-cache', '127.0.0.1:5000/cache'], /must name a registry repository/],
      [['--blob-cache', '/tmp/c', '--shared-cache', 'docker://127.0.0.1:5000/cache:tag'], /--shared-cache: .*without a tag/],
      [['--shared-creds', 'a:b'], /need --shared-cache/],
      [['--shared-cert-dir', '/etc/certs'], /need --shared-cache/],
      [['--shared-tls-verify=maybe', '--blob-cache', '/tmp/c', '--shared-cache', 'docker://h/r'], /true or false/],
    ]
    for (const [flags, message] of cases) {
      const out = io()
      expect(await main(['copy', ...flags, 'dir:/nonexistent/a', 'dir:/nonexistent/b'], out)).toBe(2)
      expect(out.stderr.text).toMatch(message)
    }
  })

  it('sharedFlagsProblem accepts a complete set', () => {
    expect(sharedFlagsProblem({ blobCache: '/c', sharedCache: 'docker://h:5000/r', sharedCreds: 'a:b' })).toBeUndefined()
    expect(sharedFlagsProblem({})).toBeUndefined()
  })

  it('are listed in the help', async () => {
    const out = io()
    expect(await main(['copy', '--help'], out)).toBe(0)
    for (const flag of ['--shared-cache <docker://host/repo>', '--shared-tls-verify', '--shared-creds', '--shared-authfile', '--shared-cert-dir <dir>']) {
      expect(out.stdout.text).toContain(flag)
    }
  })
})

describe('SharedReporter', () => {
  it('prints one progress line at the end when stderr is not a terminal', async () => {
    const out = io()
    const reporter = new SharedReporter(out, false)
    const steps = [{ done: 0, total: 7, bytes: 0 }, { done: 3, total: 7, bytes: 1024 }, { done: 7, total: 7, bytes: 12.3 * 2 ** 20 }]
    await reporter.flush(tierFlushing(steps))
    expect(out.stderr.text).toBe('shared cache: 7 of 7 blobs pushed (12.3 MiB)\n')
    expect(progressLine(3, 7, 1024)).toBe('shared cache: 3 of 7 blobs pushed (1.00 KiB)')
  })

  it('rewrites the line in place on a terminal, and a warning clears it and puts it back', async () => {
    const out = io(true)
    const reporter = new SharedReporter(out, false)
    const tier = {
      name: 'docker://h/r',
      stats: emptySharedStats(),
      async flush(opts: { onProgress?: (p: { done: number; total: number; bytes: number }) => void }) {
        opts.onProgress?.({ done: 1, total: 2, bytes: 0 })
        reporter.warn('shared cache docker://h/r: could not push\nsha256:x')
        opts.onProgress?.({ done: 2, total: 2, bytes: 0 })
        return emptySharedStats()
      },
    } as unknown as SharedTier
    await reporter.flush(tier)
    const l1 = 'shared cache: 1 of 2 blobs pushed (0 B)'
    const l2 = 'shared cache: 2 of 2 blobs pushed (0 B)'
    expect(out.stderr.text).toBe(
      `${l1}\r\x1b[Kblobcache: warning: shared cache docker://h/r: could not push sha256:x\n${l1}\r\x1b[K${l2}\r\x1b[K${l2}\n`,
    )
  })

  it('prints nothing when quiet or when nothing was queued, but still warns', async () => {
    const quiet = io()
    const reporter = new SharedReporter(quiet, true)
    reporter.warn('down')
    await reporter.flush(tierFlushing([{ done: 4, total: 4, bytes: 9 }]))
    expect(quiet.stderr.text).toBe('blobcache: warning: down\n')
    const idle = io()
    await new SharedReporter(idle, false).flush(tierFlushing([{ done: 0, total: 0, bytes: 0 }]))
    expect(idle.stderr.text).toBe('')
  })
})

describe('SharedReporter final line', () => {
  it('says how many were not pushed', async () => {
    const out = io()
    const stats = { ...emptySharedStats(), failed: 2, dropped: 1 }
    await new SharedReporter(out, false).flush(tierFlushing([{ done: 8, total: 8, bytes: 0 }], stats))
    expect(out.stderr.text).toBe('shared cache: 8 of 8 blobs pushed (0 B), 3 not pushed (see the warnings)\n')
  })
})
