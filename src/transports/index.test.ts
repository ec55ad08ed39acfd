import { describe, expect, it } from 'vitest'
import { DirReference } from './dir.js'
import { imageName, parseImageName, transportByName, transports } from './index.js'
import { OciLayoutReference } from './oci-layout.js'

describe('transport registry', () => {
  it('lists every transport by its containers/image scheme', () => {
    expect(transports.map((t) => t.name)).toEqual(expect.arrayContaining(['dir', 'oci', 'oci-archive', 'docker-archive']))
    expect(new Set(transports.map((t) => t.name)).size).toBe(transports.length)
    for (const t of transports) expect(transportByName(t.name)).toBe(t)
    expect(transportByName('nope')).toBeUndefined()
  })

  it('parses image names with the transport before the first colon', () => {
    const dir = parseImageName('dir:/tmp/img')
    expect(dir).toBeInstanceOf(DirReference)
    expect((dir as DirReference).path).toBe('/tmp/img')
    const oci = parseImageName('oci:/srv/layout:docker.io/library/alpine:3.19')
    expect(oci).toBeInstanceOf(OciLayoutReference)
    expect(oci).toMatchObject({ dir: '/srv/layout', image: 'docker.io/library/alpine:3.19' })
  })

  it.each(['dir:/tmp/img', 'dir:relative/path', 'oci:/srv/layout', 'oci:/srv/layout:latest', 'oci-archive:/tmp/a.tar:v1'])(
    'round-trips %s through imageName',
    (name) => {
      expect(imageName(parseImageName(name))).toBe(name)
    },
  )

  it('fails TRANSPORT_UNKNOWN for an unknown scheme and REFERENCE_INVALID for a bad name', () => {
    expect(() => parseImageName('nope:/x')).toThrow(expect.objectContaining({ code: 'TRANSPORT_UNKNOWN' }))
    expect(() => parseImageName('/no/transport')).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID' }))
    expect(() => parseImageName(':x')).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID' }))
    expect(() => parseImageName('dir:')).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID' }))
    expect(() => parseImageName('oci:/x:-bad')).toThrow(expect.objectContaining({ code: 'REFERENCE_INVALID' }))
  })
})
