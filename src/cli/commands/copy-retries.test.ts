// withCopyRetries: `copy --retry-times N --retry-delay D`, as skopeo retries a whole copy.
import { describe, expect, it } from 'vitest'
import { ImageError } from '../../errors.js'
import { RegistryError } from '../../registry/errors.js'
import { Capture } from '../../../test/helpers/cli.js'
import type { RunContext } from '../io.js'
import { withCopyRetries } from './copy.js'

function context(signal = new AbortController().signal): RunContext & { err: Capture } {
  const err = new Capture()
  return { io: { stdout: new Capture(), stderr: err, isTTY: false, env: {} }, signal, exitCode: 0, err }
}

/** A copy that fails with `errors` in turn, then succeeds; counts its calls. */
function flaky(errors: unknown[]): { run: () => Promise<void>; calls: number[] } {
  const calls: number[] = []
  return {
    calls,
    run: async () => {
      calls.push(Date.now())
      const e = errors.shift()
      if (e) throw e
    },
  }
}

const down = () => new RegistryError({ status: 0, registry: 'r.example', repository: 'app', action: 'pinging the registry', cause: Object.assign(new Error('connect ECONNREFUSED'), { code: 'ECONNREFUSED' }) })
const busy = () => new RegistryError({ status: 503, registry: 'r.example', repository: 'app', action: 'fetching blob' })

describe('withCopyRetries', () => {
  it('copies again after failures that may pass, with the fixed delay, and reports each attempt', async () => {
    const ctx = context()
    const copy = flaky([down(), busy()])
    await withCopyRetries(ctx, { retryTimes: 3, retryDelay: 50 }, copy.run)
    expect(copy.calls).toHaveLength(3)
    expect(copy.calls[1] - copy.calls[0]).toBeGreaterThanOrEqual(45)
    expect(ctx.err.text).toMatch(/warning: copy failed \(pinging the registry from r\.example\/app: no response \(connect ECONNREFUSED\)\); attempt 2 of 4 in 0\.05 s/)
    expect(ctx.err.text).toMatch(/HTTP 503.*attempt 3 of 4/)
  })

  it('doubles a default delay of 1 s', async () => {
    const ctx = context()
    const copy = flaky([down()])
    await withCopyRetries(ctx, { retryTimes: 1 }, copy.run)
    expect(copy.calls[1] - copy.calls[0]).toBeGreaterThanOrEqual(950)
  })

  it('gives up after retryTimes, and never retries what cannot pass or an abort', async () => {
    const errs = [down(), down(), down()]
    await expect(withCopyRetries(context(), { retryTimes: 1, retryDelay: 1 }, flaky([...errs]).run)).rejects.toBe(errs[1])
    const wrong = new ImageError('MANIFEST_UNKNOWN', 'no such image')
    const once = flaky([wrong])
    await expect(withCopyRetries(context(), { retryTimes: 5, retryDelay: 1 }, once.run)).rejects.toBe(wrong)
    expect(once.calls).toHaveLength(1)
    await expect(withCopyRetries(context(), {}, flaky([down()]).run)).rejects.toMatchObject({ code: 'REGISTRY_ERROR' })
    // an abort while waiting ends the wait with the copy's error
    const ac = new AbortController()
    const ctx = context(ac.signal)
    const pending = withCopyRetries(ctx, { retryTimes: 3, retryDelay: 60_000 }, flaky([down()]).run)
    setTimeout(() => ac.abort(), 20)
    await expect(pending).rejects.toMatchObject({ code: 'REGISTRY_ERROR' })
  })
})
