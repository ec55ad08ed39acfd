import { describe, expect, it } from 'vitest'
import { RegistryError } from './errors.js'
import { isTransient, parseRetryAfter, retriesExhausted, retryDelay, untilAborted, withRetry } from './retry.js'

const status = (s: number, retryAfter?: number) => new RegistryError({ status: s, registry: 'r', repository: 'a', action: 'x', retryAfter })

describe('retry', () => {
  it('treats 5xx, 429, resets and socket errors as transient, and nothing else', () => {
    expect(isTransient(status(500))).toBe(true)
    expect(isTransient(status(503))).toBe(true)
    expect(isTransient(status(429))).toBe(true)
    expect(isTransient(status(404))).toBe(false)
    expect(isTransient(status(401))).toBe(false)
    expect(isTransient(Object.assign(new Error('reset'), { code: 'ECONNRESET' }))).toBe(true)
    expect(isTransient(Object.assign(new Error('write EPIPE'), { code: 'EPIPE' }))).toBe(true)
    expect(isTransient(Object.assign(new Error('silent connection'), { code: 'ETIMEDOUT' }))).toBe(true)
    const wrapped = new RegistryError({ status: 0, registry: 'r', repository: 'a', action: 'x', cause: Object.assign(new Error('reset'), { code: 'ECONNRESET' }) })
    expect(isTransient(wrapped)).toBe(true)
    expect(isTransient(Object.assign(new Error('tls'), { code: 'ERR_SSL_WRONG_VERSION_NUMBER' }))).toBe(false)
    expect(isTransient(new Error('plain'))).toBe(false)
  })

  it('parses Retry-After as seconds or an HTTP date', () => {
    expect(parseRetryAfter('3')).toBe(3)
    expect(parseRetryAfter(['7'])).toBe(7)
    expect(parseRetryAfter(new Date(Date.UTC(2030, 0, 1, 0, 0, 10)).toUTCString(), Date.UTC(2030, 0, 1))).toBe(10)
    expect(parseRetryAfter('soon')).toBeUndefined()
    expect(parseRetryAfter(undefined)).toBeUndefined()
  })

  it('backs off exponentially with jitter, capped, and honours Retry-After up to a cap', () => {
    for (let i = 0; i < 50; i++) {
      const d1 = retryDelay(1, status(500))
      const d3 = retryDelay(3, status(500))
      expect(d1).toBeGreaterThanOrEqual(125)
      expect(d1).toBeLessThanOrEqual(250)
      expect(d3).toBeGreaterThanOrEqual(500)
      expect(d3).toBeLessThanOrEqual(1000)
      expect(retryDelay(20, status(500))).toBeLessThanOrEqual(8000)
    }
    expect(retryDelay(1, status(429, 2))).toBe(2000)
    expect(retryDelay(1, status(429, 3600))).toBe(30_000)
    expect(retryDelay(1, status(429, 3600), { maxRetryAfter: 5000 })).toBe(5000)
  })

  it('retries transient failures up to the attempt limit, and stops at once on others', async () => {
    let calls = 0
    await expect(withRetry(async () => (calls++ < 2 ? Promise.reject(status(502)) : 'ok'), { baseDelay: 1 })).resolves.toBe('ok')
    expect(calls).toBe(3)
    calls = 0
    await expect(withRetry(async () => (calls++, Promise.reject(status(500))), { attempts: 3, baseDelay: 1 })).rejects.toMatchObject({ status: 500 })
    expect(calls).toBe(3)
    calls = 0
    await expect(withRetry(async () => (calls++, Promise.reject(status(404))), { baseDelay: 1 })).rejects.toMatchObject({ status: 404 })
    expect(calls).toBe(1)
  })

  it('rejects with the abort reason, also while waiting to retry', async () => {
    const controller = new AbortController()
    const reason = new Error('stop')
    setTimeout(() => controller.abort(reason), 20)
    const started = Date.now()
    await expect(withRetry(async () => Promise.reject(status(503)), { baseDelay: 5000, signal: controller.signal })).rejects.toBe(reason)
    expect(Date.now() - started).toBeLessThan(1000)
    await expect(withRetry(async () => 'never', { signal: AbortSignal.abort(reason) })).rejects.toBe(reason)
  })

  it('stops waiting for a shared promise when the caller aborts, without touching the promise', async () => {
    let settle!: (v: string) => void
    const shared = new Promise<string>((r) => (settle = r))
    const controller = new AbortController()
    const reason = new Error('caller gave up')
    const waiting = untilAborted(shared, controller.signal)
    controller.abort(reason)
    await expect(waiting).rejects.toBe(reason)
    settle('done')
    await expect(untilAborted(shared, new AbortController().signal)).resolves.toBe('done')
    await expect(untilAborted(shared, AbortSignal.abort(reason))).rejects.toBe(reason)
  })

  it('does not retry again, in an enclosing loop, an error an inner loop gave up on (attempts do not multiply)', async () => {
    let calls = 0
    const refused = () => Object.assign(new Error('connect ECONNREFUSED'), { code: 'ECONNREFUSED' })
    const inner = () => withRetry(async () => {
      calls++
      throw refused()
    }, { attempts: 3, baseDelay: 1 })
    const err = await withRetry(inner, { attempts: 4, baseDelay: 1 }).catch((e: unknown) => e)
    expect(calls).toBe(3)
    expect(retriesExhausted(err)).toBe(true)
    // still transient: a caller that retries whole operations on purpose may try again
    expect(isTransient(err)).toBe(true)
    // an error the inner loop did not give up on (the first attempt's, say) is retried outside
    let first = true
    calls = 0
    await withRetry(async () => {
      calls++
      if (first) {
        first = false
        throw refused()
      }
      return 'ok'
    }, { attempts: 2, baseDelay: 1 })
    expect(calls).toBe(2)
  })
})
