import { stat } from 'node:fs/promises'
import { describe, expect, it } from 'vitest'
import { DigestMismatchError, ImageError, blobUnknown, errnoCode, isImageError, notFound } from './errors.js'

describe('typed errors', () => {
  it('ImageError carries a stable code, a message and a cause', () => {
    const cause = new Error('low level')
    const err = new ImageError('MANIFEST_INVALID', 'bad manifest', { cause })
    expect(err).toBeInstanceOf(Error)
    expect(err).toMatchObject({ name: 'ImageError', code: 'MANIFEST_INVALID', message: 'bad manifest', cause })
    expect(isImageError(err)).toBe(true)
    expect(isImageError(err, 'MANIFEST_INVALID')).toBe(true)
    expect(isImageError(err, 'BLOB_UNKNOWN')).toBe(false)
    expect(isImageError(new Error('plain'))).toBe(false)
    expect(isImageError(null)).toBe(false)
    expect(isImageError('MANIFEST_INVALID')).toBe(false)
  })

  it('DigestMismatchError is a DIGEST_INVALID naming both digests', () => {
    const err = new DigestMismatchError('sha256:aa', 'sha256:bb')
    expect(err).toBeInstanceOf(ImageError)
    expect(err).toMatchObject({ code: 'DIGEST_INVALID', expected: 'sha256:aa', actual: 'sha256:bb' })
    expect(err.message).toBe('digest mismatch: expected sha256:aa, got sha256:bb')
  })

  it('notFound and blobUnknown turn ENOENT into a typed error and let other errors through', async () => {
    const err = await stat('/nonexistent/blobcache/x').catch(blobUnknown('sha256:abc')).catch((e: unknown) => e)
    expect(err).toMatchObject({ code: 'BLOB_UNKNOWN', message: 'blob sha256:abc: not found' })
    expect(errnoCode((err as ImageError).cause)).toBe('ENOENT')
    const manifest = await stat('/nonexistent/x').catch(notFound('manifest x', 'MANIFEST_UNKNOWN')).catch((e: unknown) => e)
    expect(manifest).toMatchObject({ code: 'MANIFEST_UNKNOWN' })
    const other = Object.assign(new Error('denied'), { code: 'EACCES' })
    expect(() => notFound('x')(other)).toThrow(other)
    expect(errnoCode(other)).toBe('EACCES')
    expect(errnoCode(undefined)).toBeUndefined()
  })
})

describe('isImageError without a code', () => {
  it('accepts our codes and rejects Node system errors', async () => {
    const { readFile } = await import('node:fs/promises')
    const enoent = await readFile('/nonexistent/blobcache').catch((e: unknown) => e)
    expect(isImageError(enoent)).toBe(false)
    expect(isImageError(new ImageError('BLOB_UNKNOWN', 'x'))).toBe(true)
    expect(isImageError({ code: 'MANIFEST_UNKNOWN' })).toBe(true)
  })
})
