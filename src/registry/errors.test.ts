import { describe, expect, it } from 'vitest'
import { isImageError } from '../errors.js'
import { RegistryError, parseErrorBody, registryErrorCode } from './errors.js'

describe('RegistryError', () => {
  it('maps the registry first error code onto ours, else the status', () => {
    expect(registryErrorCode(404, [{ code: 'BLOB_UNKNOWN', message: '' }])).toBe('BLOB_UNKNOWN')
    expect(registryErrorCode(404, [{ code: 'NAME_UNKNOWN', message: '' }], 'manifest')).toBe('NAME_UNKNOWN')
    expect(registryErrorCode(429, [{ code: 'TOOMANYREQUESTS', message: '' }])).toBe('TOOMANYREQUESTS')
    expect(registryErrorCode(400, [{ code: 'MANIFEST_BLOB_UNKNOWN', message: '' }])).toBe('MANIFEST_INVALID')
    expect(registryErrorCode(404, [{ code: 'BLOB_UPLOAD_UNKNOWN', message: '' }])).toBe('BLOB_UPLOAD_INVALID')
    expect(registryErrorCode(401, [])).toBe('UNAUTHORIZED')
    expect(registryErrorCode(403, [])).toBe('DENIED')
    expect(registryErrorCode(429, [])).toBe('TOOMANYREQUESTS')
    expect(registryErrorCode(404, [], 'blob')).toBe('BLOB_UNKNOWN')
    expect(registryErrorCode(404, [], 'manifest')).toBe('MANIFEST_UNKNOWN')
    expect(registryErrorCode(500, [{ code: 'UNKNOWN', message: 'boom' }])).toBe('REGISTRY_ERROR')
  })

  it('names the registry, repository and status, and keeps the registry errors', () => {
    const body = '{"errors":[{"code":"DENIED","message":"requested access to the resource is denied","detail":{"x":1}},{"code":"X"}]}'
    const err = new RegistryError({ status: 403, registry: 'reg.example:5000', repository: 'team/app', action: 'storing manifest v1', errors: parseErrorBody(body) })
    expect(err).toMatchObject({ code: 'DENIED', status: 403, registry: 'reg.example:5000', repository: 'team/app', name: 'RegistryError' })
    expect(err.errors).toEqual([
      { code: 'DENIED', message: 'requested access to the resource is denied', detail: { x: 1 } },
      { code: 'X', message: '' },
    ])
    expect(err.message).toBe('storing manifest v1 from reg.example:5000/team/app: HTTP 403 (DENIED: requested access to the resource is denied; X)')
    expect(isImageError(err, 'DENIED')).toBe(true)
    const reset = new RegistryError({ status: 0, registry: 'r', repository: 'a', action: 'fetching blob', cause: new Error('other side closed') })
    expect(reset.message).toBe('fetching blob from r/a: no response (other side closed)')
    const alert = new RegistryError({ status: 0, registry: 'r', repository: '', action: 'pinging', cause: new Error('ssl3_read_bytes:sslv3 alert bad certificate:rec_layer_s3.c:1601:SSL alert number 42') })
    expect(alert.message).toMatch(/SSL alert number 42; the registry refused the client certificate or wants one: NAME\.cert and NAME\.key .*\(--cert-dir\)\)$/)
  })

  it('reads no diagnostics from a body that is not a registry error', () => {
    expect(parseErrorBody('<html>')).toEqual([])
    expect(parseErrorBody('{"errors":"nope"}')).toEqual([])
    expect(parseErrorBody('{"errors":[1,{"message":"m"}]}')).toEqual([{ code: 'UNKNOWN', message: 'm' }])
  })
})
