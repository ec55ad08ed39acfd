import { describe, expect, it } from 'vitest'
import { digestOf } from '../digest.js'
import { blobLocations, clearBlobLocations, recordBlobLocation } from './locations.js'

describe('blob locations', () => {
  it('remembers repositories per registry, most recent first, excluding the asking one', () => {
    clearBlobLocations()
    const d = digestOf('blob')
    recordBlobLocation(d, 'reg:5000', 'a/one')
    recordBlobLocation(d, 'other:5000', 'a/two')
    recordBlobLocation(d, 'reg:5000', 'a/three')
    recordBlobLocation(d, 'reg:5000', 'a/one')
    expect(blobLocations(d, 'reg:5000')).toEqual(['a/one', 'a/three'])
    expect(blobLocations(d, 'reg:5000', 'a/one')).toEqual(['a/three'])
    expect(blobLocations(d, 'reg')).toEqual([])
    expect(blobLocations(digestOf('other'), 'reg:5000')).toEqual([])
  })
})
