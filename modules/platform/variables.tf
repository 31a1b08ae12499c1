variable "cluster_name" {
  type        = string
  description = "Name of the environment's cluster; the prefix of every resource name."

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{0,40}$", var.cluster_name))
    error_message = "cluster_name must be lowercase letters, digits and '-', at most 41 characters."
  }
}

variable "region" {
  type        = string
  description = "AWS region of the environment."

  validation {
    condition     = can(regex("^[a-z]{2}(-[a-z]+)+-[0-9]$", var.region))
    error_message = "region must be an AWS region name such as us-east-1."
  }
}

variable "vpc_cidr" {
  type        = string
  description = "The VPC range; the seed's default Karrots CIDR is 10.0.0.0/16."
  default     = "10.0.0.0/16"
}

variable "availability_zones" {
  type        = list(string)
  description = "Availability zones of the region to use."
}

variable "tags" {
  type        = map(string)
  description = "Tags merged into every resource, on top of the karrots:cluster tag."
  default     = {}
}
